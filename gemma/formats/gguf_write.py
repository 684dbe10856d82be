"""Writing GGUF files (llama.cpp's format) for Gemma 1, 2, 3 and 4: `write_gguf(dst, cfg, state, tokenizer, dtype)`.
Gemma 4's metadata, vocabulary and rope_freqs tensor are gemma/formats/gguf_write_gemma4.py's.

The file means to llama.cpp what the model means here. Every hyperparameter is written explicitly, including what
llama.cpp would otherwise assume (the sliding-window pattern, the local RoPE base), and a config that llama.cpp
would run differently (an attention softcap on Gemma 3, a query scale other than the one llama.cpp derives) is
refused before anything is written. After the metadata is written it is read back through our own reader, which
derives what the file leaves out as llama.cpp does, and must give the model's config again.

Tensors are written with the `gguf` package: F32, F16, BF16, and its quantizers for Q8_0 and Q4_0. One-dimensional
tensors (the norms) stay F32 as llama.cpp's converter keeps them, holding offset + weight (Gemma 1-3 store w + 1,
Gemma 4 w);
a matrix whose rows do not split into the quantizer's blocks of 32 is written F16, as llama.cpp's converter falls
back. The gguf package has no quantizer for the K-quants (Q4_K_M, Q5_K_M, Q6_K, ...) or the i-quants: write bf16 and
run llama.cpp's `llama-quantize` on it.
"""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path

import numpy as np
import torch

from gemma.errors import GemmaError
from gemma.formats import gguf_write_gemma4 as gemma4
from gemma.formats.gguf import _gguf, gguf_config, gguf_names, open_gguf
from gemma.model.config import SLIDING, GemmaConfig
from gemma.tokenizer import Tokenizer
from gemma.tokenizer.templates import official_template
from gemma.writing import install, remove_path, temporary_path

# --dtype -> (ggml type name, llama_ftype for general.file_type: LLAMA_FTYPE_ALL_F32 0, MOSTLY_F16 1,
# MOSTLY_Q4_0 2, MOSTLY_Q8_0 7, MOSTLY_BF16 32).
GGUF_DTYPES = {"f32": ("F32", 0), "f16": ("F16", 1), "bf16": ("BF16", 32), "q8_0": ("Q8_0", 7), "q4_0": ("Q4_0", 2)}
_SPELLINGS = {"fp32": "f32", "float32": "f32", "fp16": "f16", "float16": "f16", "bfloat16": "bf16"}
# llama.cpp types the gguf package cannot produce (no quantizer in gguf.quants).
_NEEDS_LLAMA_QUANTIZE = re.compile(r"^(q[2-6]_k(_[sml])?|q8_k|iq\d.*|tq\d_\d)$")

ARCH_OF_GENERATION = {1: "gemma", 2: "gemma2", 3: "gemma3", 4: "gemma4"}
_SPACE = "\u2581"  # sentencepiece's visible space
# GGUF token types (llama.cpp's llama_token_type).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
# Pieces Google's tokenizer_config.json marks special, which llama.cpp's converter then makes CONTROL tokens.
_SPECIAL = re.compile(r"^(<start_of_turn>|<end_of_turn>|<unused\d+>|<mask>)$")


def gguf_dtype(name: str) -> str:
    """The canonical --dtype of a GGUF output (`fp16` spells f16, ...); a GemmaError for anything else."""
    key = _SPELLINGS.get(name.lower(), name.lower())
    if key in GGUF_DTYPES:
        return key
    if _NEEDS_LLAMA_QUANTIZE.match(key):
        raise GemmaError(
            f"--dtype {name}: the gguf package has no quantizer for {name.upper()}; write --dtype bf16 and run "
            f"llama.cpp's `llama-quantize MODEL-bf16.gguf MODEL-{key}.gguf {name.upper()}`"
        )
    raise GemmaError(f"unknown GGUF dtype {name!r}; choose one of {', '.join(GGUF_DTYPES)}")


# ---- what llama.cpp can run -------------------------------------------------------------------------------------


def gguf_architecture(cfg: GemmaConfig) -> str:
    """The llama.cpp architecture that runs this config as we do; a GemmaError saying why when there is none."""
    gen = cfg.generation
    if gen not in ARCH_OF_GENERATION:
        raise GemmaError(
            f"writing Gemma {gen} to GGUF is not supported yet (architectures written: "
            f"{', '.join(ARCH_OF_GENERATION.values())}); use --to hf and llama.cpp's convert_hf_to_gguf.py"
        )
    arch = ARCH_OF_GENERATION[gen]
    # What each llama.cpp graph does not do, and our reader would not notice from the metadata.
    unsupported = []
    if arch == "gemma" and SLIDING in cfg.layer_types:
        unsupported.append("sliding-window layers")
    if arch in ("gemma", "gemma3") and cfg.attn_softcap is not None:
        unsupported.append("an attention logit softcap")
    if arch == "gemma" and cfg.final_softcap is not None:
        unsupported.append("a final logit softcap")
    if arch == "gemma" and cfg.query_pre_attn_scalar not in (None, float(cfg.head_dim)):
        unsupported.append(f"query_pre_attn_scalar {cfg.query_pre_attn_scalar} (llama.cpp uses head_dim)")
    if arch == "gemma4":
        unsupported += gemma4.unsupported(cfg)
    if unsupported:
        raise GemmaError(f"llama.cpp's {arch!r} architecture does not run {' or '.join(unsupported)}")
    return arch


def _metadata(writer, cfg: GemmaConfig, arch: str, ftype: int, name: str) -> None:
    """The hyperparameters, as llama.cpp's converter names them, plus what llama.cpp would otherwise derive."""
    writer.add_name(name)
    writer.add_type("model")
    writer.add_file_type(ftype)
    writer.add_quantization_version(2)  # GGML_QNT_VERSION
    if arch == "gemma4":
        return gemma4.metadata(writer, cfg)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    writer.add_head_count_kv(cfg.num_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    if cfg.rope_scaling != 1.0:
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling)
    # Gemma 2 without a cap cannot be written: llama.cpp would assume its defaults (the read-back refuses it).
    if arch == "gemma2" and cfg.attn_softcap is not None:
        writer.add_attn_logit_softcapping(cfg.attn_softcap)
    if arch in ("gemma2", "gemma3"):
        if cfg.final_softcap is not None:
            writer.add_final_logit_softcapping(cfg.final_softcap)
        if SLIDING in cfg.layer_types:
            writer.add_sliding_window(cfg.sliding_window)
            writer.add_sliding_window_pattern([t == SLIDING for t in cfg.layer_types])  # true: this layer slides
            writer.add_rope_freq_base_swa(cfg.rope_local_theta)
        elif arch == "gemma2":
            writer.add_sliding_window_pattern([False] * cfg.num_layers)  # Gemma 2 slides by default


def _vocabulary(tokenizer: Tokenizer, vocab_size: int):
    """The sentencepiece vocabulary as llama.cpp's converter writes Gemma's: pieces, scores and token types. Built
    once; returns (what adds it to a writer, the unknown piece's id); `_special_ids` writes the rest."""
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError:
        raise GemmaError("writing a GGUF vocabulary needs protobuf: pip install protobuf") from None
    if "tokenizer.model" not in tokenizer.files:
        raise GemmaError("writing a GGUF vocabulary needs a sentencepiece tokenizer (tokenizer.model)")
    proto = sp_pb2.ModelProto()
    proto.ParseFromString(tokenizer.model_proto)
    Piece = sp_pb2.ModelProto.SentencePiece
    kinds = {
        Piece.NORMAL: _NORMAL,
        Piece.UNKNOWN: _CONTROL,  # Google's tokenizer_config marks <unk> special: llama.cpp makes it CONTROL
        Piece.CONTROL: _CONTROL,
        Piece.USER_DEFINED: _USER_DEFINED,
        Piece.UNUSED: _UNUSED,
        Piece.BYTE: _BYTE,
    }
    tokens, scores, types = [], [], []
    for p in proto.pieces:
        kind = kinds[p.type]
        text = p.piece
        if kind == _USER_DEFINED and _SPECIAL.match(text):
            kind = _CONTROL
        if kind == _USER_DEFINED:
            text = text.replace(_SPACE, " ")  # added tokens are stored spelled with real spaces
        tokens.append(text)
        scores.append(p.score)
        types.append(kind)
    if len(tokens) > vocab_size:
        raise GemmaError(f"the tokenizer has {len(tokens)} pieces but the model's embedding only {vocab_size} rows")
    for i in range(len(tokens), vocab_size):  # embedding rows no piece names, as llama.cpp's converter pads them
        tokens.append(f"[PAD{i}]")
        scores.append(-1000.0)
        types.append(_UNUSED)

    unk = proto.trainer_spec.unk_id

    def add(writer) -> None:
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)

    return add, unk if 0 <= unk < len(proto.pieces) else None


def _special_ids(writer, tokenizer: Tokenizer, unk: int | None) -> None:
    """The special ids and flags of every Gemma vocabulary: bos, eos, pad, unk, end of turn; <bos> added, no <eos>,
    no space prefix."""
    writer.add_bos_token_id(tokenizer.bos_id)
    writer.add_eos_token_id(tokenizer.eos_id)
    writer.add_pad_token_id(tokenizer.pad_id)
    if unk is not None:
        writer.add_unk_token_id(unk)
    if tokenizer.end_of_turn_id is not None:
        writer.add_eot_token_id(tokenizer.end_of_turn_id)
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)


# ---- tensors ------------------------------------------------------------------------------------------------------


def _ggml_type(tensor: torch.Tensor, qtype):
    """The type a tensor is stored as: F32 for vectors; F16 for a matrix the block quantizer cannot split."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if tensor.dim() < 2:
        return T.F32
    block, _ = gguf.GGML_QUANT_SIZES[qtype]
    return qtype if tensor.shape[-1] % block == 0 else T.F16


def _encode(tensor: torch.Tensor, shift: float, qtype) -> np.ndarray:
    """The tensor's bytes as `qtype` (a bf16 tensor to BF16 bit for bit; everything else through float32)."""
    gguf = _gguf()
    T = gguf.GGMLQuantizationType
    if qtype == T.BF16 and tensor.dtype == torch.bfloat16 and not shift:
        return tensor.contiguous().view(torch.int16).numpy().view(np.uint16)
    values = tensor.detach().to(torch.float32).contiguous().numpy()
    if shift:
        values = values + np.float32(shift)
    return gguf.quants.quantize(values, qtype)


# ---- the whole file -----------------------------------------------------------------------------------------------


def _config_difference(ours: GemmaConfig, back: GemmaConfig, skip: tuple[str, ...] = ()) -> list[str]:
    """The fields in which the config read back from the file differs from the model's (float32 rounding aside,
    the local RoPE base and window where no layer slides, and the fields in `skip`)."""
    skip = {"hf_repo", *skip}
    if SLIDING not in ours.layer_types:
        skip |= {"rope_local_theta", "sliding_window"}
    out = []
    for f in dataclasses.fields(GemmaConfig):
        a, b = getattr(ours, f.name), getattr(back, f.name)
        if f.name == "layer_types":
            a, b = ours.layer_types, back.layer_types  # normalised by the dataclass: empty means all full
        if f.name in skip or a == b:
            continue
        if isinstance(a, float) and isinstance(b, float) and np.float32(a) == np.float32(b):
            continue
        if f.name == "query_pre_attn_scalar" and (a or float(ours.head_dim)) == (b or float(back.head_dim)):
            continue
        out.append(f"{f.name} {a!r} would be {b!r}")
    return out


def write_gguf(
    dst: str | Path,
    cfg: GemmaConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    dtype: str = "bf16",
    name: str = "Gemma",
) -> dict[str, int]:
    """Write the model to `dst` (a .gguf file) by a temporary name, renamed into place only once complete and read
    back. Returns how many tensors were written as each ggml type ({"BF16": 144, "F32": 92})."""
    gguf = _gguf()
    dst = Path(dst)
    key = gguf_dtype(dtype)
    type_name, ftype = GGUF_DTYPES[key]
    qtype = gguf.GGMLQuantizationType[type_name]
    arch = gguf_architecture(cfg)
    names = gguf_names(cfg)
    if set(state) != set(names):
        missing = sorted(set(names) - set(state)) or sorted(set(state) - set(names))
        raise GemmaError(f"the state dict does not match the config (first mismatch: {missing[0]!r})")

    tmp = temporary_path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        vocabulary = gemma4.vocabulary if arch == "gemma4" else _vocabulary
        add_pieces, unk = vocabulary(tokenizer, cfg.vocab_size)
        template = official_template(cfg.generation)

        freqs = gemma4.rope_freqs(cfg) if arch == "gemma4" else None  # Gemma 4's full layers' partial RoPE

        def new_writer():  # a GGUFWriter with every key/value written (a writer writes its keys only once)
            writer = gguf.GGUFWriter(tmp, arch)
            _metadata(writer, cfg, arch, ftype, name)
            add_pieces(writer)
            _special_ids(writer, tokenizer, unk)
            writer.add_chat_template(template)
            if freqs is not None:
                writer.add_tensor_info(gemma4.ROPE_FREQS, freqs.shape, freqs.dtype, freqs.nbytes)
            return writer

        # The metadata first, alone (and rope_freqs), read back: a config llama.cpp would read differently is
        # refused in a moment. Gemma 4's other tensor-borne fields are checked once the file is written.
        _write_header(new_writer(), tmp, freqs=freqs)
        skip = gemma4.TENSOR_DERIVED if arch == "gemma4" else ()
        differences = _config_difference(cfg, gguf_config(open_gguf(tmp), str(dst)), skip)
        if differences:
            raise GemmaError(f"{dst}: llama.cpp would read this model differently: {'; '.join(differences)}")

        writer = new_writer()
        counts: dict[str, int] = {"F32": 1} if freqs is not None else {}
        plan = []
        for native, tensor in state.items():
            t = _ggml_type(tensor, qtype)
            byte_shape = gguf.quants.quant_shape_to_byte_shape(tuple(tensor.shape), t)
            writer.add_tensor_info(names[native], byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape)), t)
            plan.append((native, t))
            counts[t.name] = counts.get(t.name, 0) + 1
        _write_header(writer, tmp, tensors=True)
        try:
            if freqs is not None:
                writer.write_tensor_data(freqs)
            for native, t in plan:
                shift = cfg.norm_offset if native.endswith("norm.weight") else 0.0
                writer.write_tensor_data(_encode(state[native], shift, t))
            writer.fout[0].flush()
            os.fsync(writer.fout[0].fileno())
        finally:
            writer.close()
        if arch == "gemma4":  # what the tensors say of the config, now that they are there
            differences = _config_difference(cfg, gguf_config(open_gguf(tmp), str(dst)))
            if differences:
                raise GemmaError(f"{dst}: llama.cpp would read this model differently: {'; '.join(differences)}")
        install(tmp, dst)
    except OSError as exc:
        raise GemmaError(f"{dst}: cannot write ({(exc.strerror or str(exc)).lower()})") from None
    finally:
        remove_path(tmp)
    return counts


def _write_header(writer, path: Path, tensors: bool = False, freqs: np.ndarray | None = None) -> None:
    """The header, keys and tensor infos; without `tensors`, the file is closed after them (and `freqs`, the
    one tensor a metadata-only file carries)."""
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    if not tensors:
        if freqs is not None:
            writer.write_tensor_data(freqs)
        writer.close()
