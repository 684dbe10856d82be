"""HF folders we write carry the tokenizer files Google's repos carry (tokenizer_config.json: <bos> added, the
special tokens, the official chat template), so that transformers' AutoTokenizer on the folder encodes and
apply_chat_templates exactly as we do (issue 17's lm-eval report: without them transformers added no <bos>)."""

from __future__ import annotations

import pytest

transformers = pytest.importorskip("transformers")

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "user", "content": "你好！"},
        {"role": "assistant", "content": "你好，有什么可以帮你？"},
        {"role": "user", "content": "2+2?"},
    ],
]


def test_a_gemma3_export_tokenizes_in_transformers_as_ours(tiny_folder, tmp_path):
    import gemma
    from gemma.formats.convert import convert

    convert(tiny_folder, tmp_path / "hf", "hf")
    _, ours = gemma.load(tmp_path / "hf")
    assert ours.template_note is None  # the official template: nothing to say
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in ["Hello, world!", "今天天气很好 😀"]:
        assert theirs.encode(text) == ours.encode(text)  # <bos> first, as Gemma's repos have it
    system = [{"role": "system", "content": "Be brief."}]
    for messages in [*CONVERSATIONS, system + CONVERSATIONS[0]]:
        got = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
        assert list(got["input_ids"] if hasattr(got, "keys") else got) == ours.apply_chat(messages)


def test_a_gemma4_export_tokenizes_in_transformers_as_ours(tmp_path):
    import gemma
    from gemma.formats.convert import convert
    from test_gemma4 import hf_gemma4
    from tiny_tokenizer import build_gemma4_tokenizer_json

    hf_gemma4("E", vocab=1024).save_pretrained(tmp_path / "src")
    build_gemma4_tokenizer_json(tmp_path / "src")
    (tmp_path / "src" / "tokenizer_config.json").unlink()  # the official template must come from us
    convert(tmp_path / "src", tmp_path / "hf", "hf")
    _, ours = gemma.load(tmp_path / "hf")
    theirs = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    generation = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert generation.eos_token_id == list(ours.stop_ids)  # <eos>, <turn|> and <|tool_response>
    assert ours.marker_id("<|tool_response>") in generation.eos_token_id
    tools = [{"type": "function", "function": {"name": "now", "description": "The time."}}]
    for messages in CONVERSATIONS:
        for kwargs in ({}, {"tools": tools, "enable_thinking": True}):
            got = theirs.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, **kwargs)
            assert list(got["input_ids"] if hasattr(got, "keys") else got) == ours.apply_chat(messages, **kwargs)
