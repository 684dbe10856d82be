"""Tiny GGUF files for the tests, written with gguf.GGUFWriter the way llama.cpp's converter writes Gemma.

Importable helper (not a test file). What the converter does, and these files do too:
- norm weights are stored as weight + 1, in F32;
- the vocabulary comes from a sentencepiece BPE model (trained here in a few milliseconds), with the chat markers
  and <unk> marked control, added whitespace pieces spelled with real spaces, and score -1000 on control and
  user-defined pieces, exactly as in the real Gemma 3 270M file;
- the tensors carry the architecture's GGUF names, dimensions listed fastest first.

Weights can be quantized per tensor. gguf.quants quantizes Q4_0, Q5_0, Q8_0, BF16 and a few more but no K-quant,
so Q4_K and Q6_K are packed here by a plain round-to-nearest quantizer that also returns the exact values the
block format decodes to, computed independently of gguf's dequantizer.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import sentencepiece as spm

Q = gguf.GGMLQuantizationType

# Tiny shapes per architecture. gemma: MHA with hidden (64) != heads x head_dim (128), like gemma 7b. gemma2: GQA.
# gemma3: MQA, six layers so that the default 5:1 pattern has a global layer. intermediate is 256 so that ffn_down
# rows can hold a 256-value K-quant block.
SHAPES = {
    "gemma": dict(hidden=64, inter=256, layers=2, heads=4, kv=4, head_dim=32),
    "gemma2": dict(hidden=64, inter=256, layers=3, heads=4, kv=2, head_dim=16),
    "gemma3": dict(hidden=64, inter=256, layers=6, heads=4, kv=1, head_dim=16),
}
ARCHS = tuple(SHAPES)

# ---- the vocabulary ---------------------------------------------------------------------------------------------

_CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello, world! How are you today? I am fine, thank you.",
    "Gemma is a family of lightweight open models.",
    "def add(a, b):\n    return a + b\n",
    "for i in range(10):\n\tprint(i)\n",
    "Numbers: 0 1 2 3 4 5 6 7 8 9 10 42 2024.",
    "今天天气很好，我们去公园散步吧。",
    "我喜欢学习机器学习和自然语言处理。",
    "<h1>Title</h1>\n\nSpaces   between    words.",
]
CHAT_MARKERS = ["<start_of_turn>", "<end_of_turn>"]
# Added pieces, as Gemma has them: chat markers, an html tag, whitespace runs (U+2581 in the sentencepiece model).
_USER_DEFINED = CHAT_MARKERS + ["<h1>", "\n", "\n\n", "\u2581\u2581", "\u2581\u2581\u2581", "\u2581\u2581\u2581\u2581"]


def tiny_sentencepiece() -> bytes:
    """A tiny BPE sentencepiece model laid out like Gemma's (pad 0, eos 1, bos 2, unk 3, byte pieces)."""
    out = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_CORPUS),
        model_writer=out,
        model_type="bpe",
        vocab_size=420,
        pad_id=0,
        eos_id=1,
        bos_id=2,
        unk_id=3,
        pad_piece="<pad>",
        eos_piece="<eos>",
        bos_piece="<bos>",
        unk_piece="<unk>",
        user_defined_symbols=_USER_DEFINED,
        byte_fallback=True,
        character_coverage=1.0,
        add_dummy_prefix=False,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_by_whitespace=False,
        allow_whitespace_only_pieces=True,
        hard_vocab_limit=False,
        num_threads=1,
        minloglevel=2,
    )
    return out.getvalue()


@dataclass
class Vocab:
    proto: bytes  # the sentencepiece model the token list was exported from
    tokens: list[str]
    scores: list[float]
    types: list[int]  # GGUF token types: 1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte


def tiny_vocab() -> Vocab:
    """The token list, scores and types of the tiny model, as llama.cpp's converter exports them."""
    proto = tiny_sentencepiece()
    sp = spm.SentencePieceProcessor(model_proto=proto)
    tokens, scores, types = [], [], []
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):
            kind = 6
        elif sp.is_control(i) or sp.is_unknown(i) or piece in CHAT_MARKERS:
            kind = 3  # the converter marks every special token of tokenizer_config control, <unk> included
        elif piece in _USER_DEFINED:
            kind = 4
        else:
            kind = 1
        score = -1000.0 if kind in (3, 4) else sp.get_score(i)
        if kind == 4 and not piece.replace("\u2581", ""):
            piece = piece.replace("\u2581", " ")  # added whitespace tokens are stored with real spaces
        tokens.append(piece)
        scores.append(score)
        types.append(kind)
    return Vocab(proto, tokens, scores, types)


# ---- K-quant packers ----------------------------------------------------------------------------------------------


def quantize_q6_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw Q6_K rows, the values they decode to). Blocks of 256: 16 int8 sub-block scales, 6-bit values."""
    rows, cols = x.shape
    sub = x.astype(np.float32).reshape(-1, 16, 16)  # (blocks, sub-blocks, values)
    want = np.abs(sub).max(-1) / np.float32(31)  # step per sub-block, values in [-32, 31]
    d = (want.max(-1) / np.float32(127)).astype(np.float16)
    d32 = d.astype(np.float32)
    sc = np.round(want / np.where(d32 > 0, d32, 1)[:, None]).clip(-128, 127).astype(np.int8)
    step = d32[:, None] * sc.astype(np.float32)  # (blocks, 16), as the decoder computes it
    q = np.round(sub / np.where(step > 0, step, 1)[..., None]).clip(-32, 31).astype(np.float32)
    decoded = (step[..., None] * q).reshape(rows, cols)

    q6 = (q + 32).astype(np.uint8).reshape(-1, 256)
    low = (q6 & 0x0F).reshape(-1, 2, 2, 64)  # (blocks, half, nibble, 64)
    ql = low[:, :, 0] | (low[:, :, 1] << 4)
    high = (q6 >> 4).reshape(-1, 2, 4, 32)  # (blocks, half, bit pair, 32)
    qh = high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)
    raw = np.concatenate(
        [ql.reshape(-1, 128), qh.reshape(-1, 64), sc.view(np.uint8), d.reshape(-1, 1).view(np.uint8)], axis=1
    )  # 128 + 64 + 16 + 2 = 210 bytes
    return raw.reshape(rows, -1), decoded


def quantize_q4_k(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw Q4_K rows, the values they decode to). Blocks of 256: 8 sub-blocks with 6-bit scale and min."""
    rows, cols = x.shape
    sub = x.astype(np.float32).reshape(-1, 8, 32)
    lo = np.minimum(sub.min(-1), 0)
    want_scale = (sub.max(-1) - lo) / np.float32(15)
    want_min = -lo
    d = (want_scale.max(-1) / np.float32(63)).astype(np.float16)
    dmin = (want_min.max(-1) / np.float32(63)).astype(np.float16)
    d32, dmin32 = d.astype(np.float32), dmin.astype(np.float32)
    sc = np.round(want_scale / np.where(d32 > 0, d32, 1)[:, None]).clip(0, 63).astype(np.uint8)
    mn = np.round(want_min / np.where(dmin32 > 0, dmin32, 1)[:, None]).clip(0, 63).astype(np.uint8)
    step = d32[:, None] * sc.astype(np.float32)
    offset = dmin32[:, None] * mn.astype(np.float32)
    q = np.round((sub + offset[..., None]) / np.where(step > 0, step, 1)[..., None]).clip(0, 15)
    q = q.astype(np.float32)
    decoded = (step[..., None] * q - offset[..., None]).reshape(rows, cols)

    q4 = q.astype(np.uint8).reshape(-1, 4, 2, 32)  # (blocks, byte group, nibble, 32)
    qs = (q4[:, :, 0] | (q4[:, :, 1] << 4)).reshape(-1, 128)
    scales = np.concatenate(
        [
            (sc[:, :4] & 0x3F) | ((sc[:, 4:] >> 4) << 6),
            (mn[:, :4] & 0x3F) | ((mn[:, 4:] >> 4) << 6),
            (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4),
        ],
        axis=1,
    )
    raw = np.concatenate(
        [d.reshape(-1, 1).view(np.uint8), dmin.reshape(-1, 1).view(np.uint8), scales, qs], axis=1
    )  # 2 + 2 + 12 + 128 = 144 bytes
    return raw.reshape(rows, -1), decoded


_OWN_QUANTIZERS = {Q.Q4_K: quantize_q4_k, Q.Q6_K: quantize_q6_k}


# ---- the file -----------------------------------------------------------------------------------------------------


@dataclass
class TinyFile:
    path: Path
    arch: str
    source: dict[str, np.ndarray]  # GGUF name -> weights before quantization (PyTorch shape, zero-centred norms)
    decoded: dict[str, np.ndarray] = field(default_factory=dict)  # K-quant tensors: the exact decoded values
    vocab: Vocab | None = None


def _weights(arch: str, n_vocab: int, seed: int) -> dict[str, np.ndarray]:
    s = SHAPES[arch]
    rng = np.random.default_rng(seed)

    def w(*shape, scale=0.05):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    h, q, kv = s["hidden"], s["heads"] * s["head_dim"], s["kv"] * s["head_dim"]
    out = {"token_embd.weight": w(n_vocab, h, scale=0.5), "output_norm.weight": w(h, scale=0.3)}
    for i in range(s["layers"]):
        b = f"blk.{i}."
        out.update(
            {
                b + "attn_norm.weight": w(h, scale=0.3),
                b + "attn_q.weight": w(q, h),
                b + "attn_k.weight": w(kv, h),
                b + "attn_v.weight": w(kv, h),
                b + "attn_output.weight": w(h, q),
                b + "ffn_norm.weight": w(h, scale=0.3),
                b + "ffn_gate.weight": w(s["inter"], h),
                b + "ffn_up.weight": w(s["inter"], h),
                b + "ffn_down.weight": w(h, s["inter"]),
            }
        )
        if arch != "gemma":
            out[b + "post_attention_norm.weight"] = w(h, scale=0.3)
            out[b + "post_ffw_norm.weight"] = w(h, scale=0.3)
        if arch == "gemma3":
            out[b + "attn_q_norm.weight"] = w(s["head_dim"], scale=0.3)
            out[b + "attn_k_norm.weight"] = w(s["head_dim"], scale=0.3)
    return out


def metadata(arch: str, layers: int | None = None) -> dict:
    """The architecture keys llama.cpp's converter writes for a tiny model of `arch`."""
    s = SHAPES.get(arch, SHAPES["gemma3"])
    kv = {
        f"{arch}.context_length": 512,
        f"{arch}.embedding_length": s["hidden"],
        f"{arch}.block_count": layers or s["layers"],
        f"{arch}.feed_forward_length": s["inter"],
        f"{arch}.attention.head_count": s["heads"],
        f"{arch}.attention.head_count_kv": s["kv"],
        f"{arch}.attention.key_length": s["head_dim"],
        f"{arch}.attention.value_length": s["head_dim"],
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-6,
    }
    if arch == "gemma2":
        kv.update(
            {
                f"{arch}.attention.sliding_window": 32,
                f"{arch}.attn_logit_softcapping": 50.0,
                f"{arch}.final_logit_softcapping": 30.0,
            }
        )
    if arch == "gemma3":
        kv.update({f"{arch}.rope.freq_base": 1_000_000.0, f"{arch}.attention.sliding_window": 32})
    return kv


def add_value(writer: gguf.GGUFWriter, key: str, value) -> None:
    if isinstance(value, bool):
        writer.add_bool(key, value)
    elif isinstance(value, int):
        writer.add_uint32(key, value)
    elif isinstance(value, float):
        writer.add_float32(key, value)
    elif isinstance(value, str):
        writer.add_string(key, value)
    else:
        writer.add_array(key, list(value))


def write_tiny_gguf(
    path,
    arch: str = "gemma3",
    quant: dict[str, Q] | None = None,
    *,
    seed: int = 0,
    meta: dict | None = None,
    drop_meta: tuple[str, ...] = (),
    drop: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    with_tensors: bool = True,
) -> TinyFile:
    """Write a tiny GGUF file of `arch` ("gemma", "gemma2", "gemma3"; another name writes a gemma3-shaped file
    under that architecture).

    `quant` maps a tensor-name suffix ("attn_q.weight") to a type; everything else is F32. `meta` adds or replaces
    metadata keys, `drop_meta` removes them; `drop` leaves out tensors, `extra` adds raw F32 tensors (PyTorch
    shape); `with_tensors=False` writes metadata only.
    """
    path = Path(path)
    vocab = tiny_vocab()
    shape_arch = arch if arch in SHAPES else "gemma3"
    source = _weights(shape_arch, len(vocab.tokens), seed)
    tiny = TinyFile(path, arch, source, vocab=vocab)

    kv = metadata(arch)
    kv.update(
        {
            "tokenizer.ggml.model": "llama",
            "tokenizer.ggml.pre": "default",
            "tokenizer.ggml.tokens": vocab.tokens,
            "tokenizer.ggml.scores": vocab.scores,
            "tokenizer.ggml.token_type": vocab.types,
            "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.add_space_prefix": False,
        }
    )
    kv.update(meta or {})
    writer = gguf.GGUFWriter(str(path), arch)
    for key, value in kv.items():
        if key not in drop_meta:
            add_value(writer, key, value)

    if with_tensors:
        for name, value in source.items():
            if name in drop:
                continue
            if name.endswith("norm.weight"):
                writer.add_tensor(name, value + np.float32(1))  # the converter stores Gemma norms as weight + 1
                continue
            qtype = next((t for suffix, t in (quant or {}).items() if name.endswith(suffix)), Q.F32)
            if qtype == Q.F32:
                writer.add_tensor(name, value)
            elif qtype in _OWN_QUANTIZERS:
                raw, tiny.decoded[name] = _OWN_QUANTIZERS[qtype](value)
                writer.add_tensor(name, raw, raw_dtype=qtype)
            elif qtype == Q.F16:
                writer.add_tensor(name, value.astype(np.float16))
            else:
                try:
                    raw = gguf.quants.quantize(value, qtype)
                except NotImplementedError:
                    # A type gguf can neither produce nor decode (Q8_K, ...): zero blocks of the right size,
                    # enough for a reader to reject it.
                    block, size = gguf.GGML_QUANT_SIZES[qtype]
                    raw = np.zeros((value.shape[0], value.shape[1] // block * size), dtype=np.uint8)
                writer.add_tensor(name, raw, raw_dtype=qtype)
        for name, value in (extra or {}).items():
            writer.add_tensor(name, value.astype(np.float32))

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tiny
