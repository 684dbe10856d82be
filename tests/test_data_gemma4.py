"""Gemma 4 training records: tools, tool calls, tool responses and reasoning, encoded in the official format with
the loss on what model turns write (content, calls, end markers, thoughts unless masked), checked token by token."""

from __future__ import annotations

import json

import pytest

from gemma.errors import GemmaError
from train.data import IGNORE, load_dataset
from train.data_gemma4 import encode_gemma4

TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}
RECORD = {
    "tools": [TOOL],
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "reasoning_content": "Call the tool.",
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": {"city": "Paris"}}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "20 C"},
        {"role": "assistant", "content": "It is 20 C."},
    ],
}


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    pytest.importorskip("transformers")
    from gemma.tokenizer import Tokenizer
    from tiny_tokenizer import build_gemma4_tokenizer_json

    return Tokenizer(build_gemma4_tokenizer_json(tmp_path_factory.mktemp("tok")) / "tokenizer.json")


def expected(tok, train_on_thoughts=True):
    """(ids, trained) written out by hand from the template, span by span."""
    m = tok.marker_id
    q = m('<|"|>')
    prompt, model, thought = False, True, train_on_thoughts
    spans = [
        ([tok.bos_id, m("<|turn>")], prompt),
        ("system\n", prompt),
        ([m("<|tool>")], prompt),
        ("declaration:get_weather{description:", prompt),
        ([q], prompt),
        ("Weather", prompt),
        ([q], prompt),
        (",parameters:{properties:{city:{type:", prompt),
        ([q], prompt),
        ("STRING", prompt),
        ([q], prompt),
        ("}},required:[", prompt),
        ([q], prompt),
        ("city", prompt),
        ([q], prompt),
        ("],type:", prompt),
        ([q], prompt),
        ("OBJECT", prompt),
        ([q], prompt),
        ("}}", prompt),
        ([m("<tool|>"), m("<turn|>")], prompt),
        ("\n", prompt),
        ([m("<|turn>")], prompt),
        ("user\nWeather in Paris?", prompt),
        ([m("<turn|>")], prompt),
        ("\n", prompt),
        ([m("<|turn>")], prompt),
        ("model\n", prompt),  # the generation prompt ends here; what follows the model writes
        ([m("<|channel>")], thought),
        ("thought\nCall the tool.\n", thought),
        ([m("<channel|>")], thought),
        ([m("<|tool_call>")], model),
        ("call:get_weather{city:", model),
        ([q], model),
        ("Paris", model),
        ([q], model),
        ("}", model),
        ([m("<tool_call|>")], model),
        ([m("<|tool_response>")], prompt),  # the tool's answer
        ("response:get_weather{value:", prompt),
        ([q], prompt),
        ("20 C", prompt),
        ([q], prompt),
        ("}", prompt),
        ([m("<tool_response|>")], prompt),
        ("It is 20 C.", model),
        ([m("<turn|>")], model),
        ("\n", prompt),
    ]
    ids, trained = [], []
    for piece, flag in spans:
        piece = tok.encode_content(piece) if isinstance(piece, str) else piece
        ids += piece
        trained += [flag] * len(piece)
    return ids, trained


@pytest.mark.parametrize("train_on_thoughts", [True, False])
def test_a_tool_call_record_token_by_token(tok, train_on_thoughts):
    example, truncated = encode_gemma4(RECORD["messages"], RECORD["tools"], tok, 4096, False, train_on_thoughts)
    ids, trained = expected(tok, train_on_thoughts)
    assert not truncated and example.input_ids == ids
    assert example.targets == [t if keep else IGNORE for t, keep in zip(ids[1:], trained[1:])] + [IGNORE]
    # The prompt part is what generation is given: the conversation so far with the generation prompt.
    prompt = tok.apply_chat(RECORD["messages"][:1], tools=RECORD["tools"])
    assert ids[: len(prompt)] == prompt


def test_train_on_prompt_trains_everything_after_bos(tok):
    example, _ = encode_gemma4(RECORD["messages"], RECORD["tools"], tok, 4096, train_on_prompt=True)
    assert all(t != IGNORE for t in example.targets[:-1])


def test_a_long_record_is_cut_without_its_end_marker(tok):
    full, _ = encode_gemma4(RECORD["messages"], RECORD["tools"], tok, 4096)
    cut, truncated = encode_gemma4(RECORD["messages"], RECORD["tools"], tok, len(full.input_ids) - 3)
    assert truncated and cut.input_ids == full.input_ids[: len(full.input_ids) - 3]
    assert tok.end_of_turn_id not in [t for t in cut.targets if t != IGNORE][-3:]


def test_records_load_from_a_file_with_their_errors_located(tok, tmp_path):
    path = tmp_path / "tools.jsonl"
    bad = {"messages": [{"role": "user", "content": "x"}, {"role": "tool", "content": "y"}, RECORD["messages"][3]]}
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps({"instruction": "2+2?", "output": "4"}) + "\n")
    examples, stats = load_dataset(path, tok, 4096)
    assert stats.examples == 2 and examples[0].input_ids == expected(tok)[0]
    path.write_text(json.dumps(RECORD) + "\n" + json.dumps(bad) + "\n")
    with pytest.raises(GemmaError, match=f"{path}:2: message 1 is a tool response with no tool call"):
        load_dataset(path, tok, 4096)


def test_gemma3_tokenizers_refuse_tool_records(tmp_path):
    from gemma.tokenizer import Tokenizer
    from tiny_tokenizer import tiny_tokenizer_proto

    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps(RECORD) + "\n")
    with pytest.raises(GemmaError, match="'reasoning_content' needs Gemma 4's chat format"):
        load_dataset(path, Tokenizer.from_bytes(tiny_tokenizer_proto()), 4096)


def test_sft_trains_on_tool_records_from_the_command_line(tmp_path):
    """python -m train.sft on a Gemma 4 folder with only tokenizer.json, on tool-use records, with
    --no-train-on-thoughts: it trains, and its adapter loads back."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gemma
    from test_gemma4 import hf_gemma4
    from tiny_tokenizer import build_gemma4_tokenizer_json

    folder = tmp_path / "model"
    hf_gemma4("E", vocab=1024).save_pretrained(folder)
    build_gemma4_tokenizer_json(folder)
    data = tmp_path / "tools.jsonl"
    data.write_text((json.dumps(RECORD) + "\n") * 4)
    root = Path(__file__).resolve().parent.parent
    cmd = [sys.executable, "-m", "train.sft", "--model", folder, "--data", data, "--max-steps", 2, "--batch-size", 2]
    cmd += ["--precision", "fp32", "--lora-r", 4, "--no-train-on-thoughts", "--out", tmp_path / "run"]
    run = subprocess.run(
        list(map(str, cmd)), capture_output=True, text=True, cwd=root, env={**os.environ, "PYTHONPATH": str(root)}
    )
    assert run.returncode == 0, run.stderr[-3000:]
    model, tok = gemma.load(folder, adapter=tmp_path / "run" / "adapter")
    assert tok.chat_format == 4 and any("lora" in n for n, _ in model.named_parameters())
