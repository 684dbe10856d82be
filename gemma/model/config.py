"""The model configuration: one dataclass whose fields describe the architecture, presets as data.

Behaviour follows the fields (`attn_softcap`, `use_qk_norm`, `sliding_window`, ...), never a model's name.
HF's config.json is a format, read and written by gemma/formats/hf_config.py.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from gemma.errors import GemmaError

SLIDING = "sliding"
FULL = "full"

# The on-disk marker of a native config.json (an HF one has `model_type` instead).
NATIVE_FORMAT = "gemma-sft"


# Upper bounds of the size fields: far above any released model (Gemma's largest has a vocabulary of 262208,
# width 5376, MLP 36864, 32 heads of 256, 62 layers and 131072 positions), yet low enough that garbage in a
# config.json (a vocab_size of 1e40, a million layers) is refused by name before any size is computed from it.
MAX_VOCAB = 2**31 - 1  # token ids are int32 in sentencepiece and in GGUF
MAX_WIDTH = 2**20  # hidden, intermediate and head widths: 28x the widest Gemma MLP
MAX_HEADS = 2**12  # query or key/value heads: 128x Gemma's most
MAX_LAYERS = 1024  # 16x Gemma's deepest; per-layer tables are built from this count before weights are checked
MAX_POSITIONS = 2**24  # RoPE angles come from float32 positions, which are exact integers only up to 2**24

# Each integer size field and its bound.
_SIZES = {
    "vocab_size": MAX_VOCAB,
    "hidden_size": MAX_WIDTH,
    "intermediate_size": MAX_WIDTH,
    "num_layers": MAX_LAYERS,
    "num_heads": MAX_HEADS,
    "num_kv_heads": MAX_HEADS,
    "head_dim": MAX_WIDTH,
    "max_seq_len": MAX_POSITIONS,
}


def shown(value: Any, limit: int = 60) -> str:
    """repr(value), cut short: a message built from a file must stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def is_finite(value: Any) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an int too large for a float
        return False


class ConfigFieldError(GemmaError):
    """A config field that fails validation, by its dataclass name, so that the reader of a file can name the key
    as the file spells it (`spelled`): "field 'FIELD' PROBLEM ['OTHER'TAIL]", where OTHER is a second field."""

    def __init__(self, field: str, problem: str, other: str | None = None, tail: str = ""):
        self.field, self.problem, self.other, self.tail = field, problem, other, tail
        super().__init__(self._text("config", {}, "field"))

    def _text(self, where: str, names: dict[str, str], noun: str) -> str:
        text = f"{where}: {noun} {names.get(self.field, self.field)!r} {self.problem}"
        return text if self.other is None else f"{text} {names.get(self.other, self.other)!r}{self.tail}"

    def spelled(self, where: str, names: dict[str, str], noun: str = "field") -> GemmaError:
        """The same error as `where: field 'KEY' ...`, with `names` mapping field names to the file's keys."""
        return GemmaError(self._text(where, names, noun))


def check_size(field: str, value: Any, top: int) -> int:
    """`value` if it is an integer in [1, top]; else a ConfigFieldError naming `field`."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigFieldError(field, f"must be an integer, got {shown(value)}")
    if not 1 <= value <= top:
        raise ConfigFieldError(field, f"must be between 1 and {top}, got {shown(value)}")
    return value


def _check_number(field: str, value: Any, optional: bool = False) -> None:
    """A positive finite number (None allowed when `optional`); else a ConfigFieldError naming `field`."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigFieldError(field, f"must be a number, got {shown(value)}")
    if not is_finite(value) or value <= 0:
        raise ConfigFieldError(field, f"must be a positive finite number, got {shown(value)}")


@dataclass
class GemmaConfig:
    vocab_size: int  # rows of the (tied) embedding matrix
    hidden_size: int  # residual stream width
    intermediate_size: int  # GeGLU inner width
    num_layers: int  # decoder blocks
    num_heads: int  # query heads
    num_kv_heads: int  # key/value heads: 1 = MQA, num_heads = MHA, otherwise GQA
    head_dim: int  # per-head width; independent of hidden_size (gemma 7b: 16 x 256 != 3072)
    norm_eps: float = 1e-6  # RMSNorm epsilon
    rope_theta: float = 10_000.0  # RoPE base of full-attention (global) layers
    rope_local_theta: float = 10_000.0  # RoPE base of sliding-window (local) layers
    rope_scaling: float = 1.0  # linear position scaling on global layers (Gemma 3 4b+: 8)
    query_pre_attn_scalar: float | None = None  # attention scale is this ** -0.5; None means head_dim
    attn_softcap: float | None = None  # tanh softcap of attention logits (Gemma 2: 50)
    final_softcap: float | None = None  # tanh softcap of output logits (Gemma 2: 30)
    use_qk_norm: bool = False  # RMSNorm over head_dim on queries and keys (Gemma 3)
    sandwich_norms: bool = False  # extra norms after attention and around the MLP (Gemma 2, 3)
    sliding_window: int | None = None  # a local layer's query sees keys with q_pos - k_pos < sliding_window
    layer_types: tuple[str, ...] = ()  # per layer: "sliding" or "full"; empty means all full
    max_seq_len: int = 8192  # context length the model was trained for
    hf_repo: str | None = None  # the hub repo a preset was read from (informational only)
    # Gemma 4's differences (the defaults are Gemma 1-3's):
    norm_offset: float = 1.0  # RMSNorm multiplies by offset + w: 1 (a zero-centred w) or 0 (Gemma 4: w itself)
    fixed_attn_scale: float | None = None  # the scale of q @ k^T when set (Gemma 4: 1, its q/k norms set the size)
    use_v_norm: bool = False  # a weightless RMSNorm over head_dim on the values (Gemma 4)
    full_head_dim: int | None = None  # head_dim of the full-attention layers (Gemma 4: 512); None: head_dim
    full_kv_heads: int | None = None  # key/value heads of the full-attention layers; None: num_kv_heads
    full_k_eq_v: bool = False  # full-attention layers take their values from the key projection (no v)
    rope_full_rotated: float = 1.0  # share of a full layer's head_dim that RoPE turns (Gemma 4: 0.25, proportional)
    layer_scalar: bool = False  # each layer's output is multiplied by a learned scalar (Gemma 4)
    kv_shared_layers: int = 0  # the last this many layers attend with the K/V of the last earlier layer of their kind
    double_wide_mlp: bool = False  # the KV-sharing layers' MLP is 2 x intermediate_size wide (Gemma 4 E2B)
    per_layer_input_size: int = 0  # width of each layer's per-layer embedding (PLE; Gemma 4 E2B, E4B: 256); 0: none
    per_layer_vocab_size: int | None = None  # rows of the per-layer embedding table; None: vocab_size
    num_experts: int = 0  # experts of the MoE block beside each layer's dense MLP (Gemma 4 26B-A4B: 128); 0: none
    experts_per_token: int = 0  # experts each token is routed to (top-k)
    expert_intermediate_size: int = 0  # each expert's GeGLU inner width

    def __post_init__(self):
        # Sizes first, bounded: everything after (the layer list here, the model's tables later) is built from them.
        for name, top in _SIZES.items():
            check_size(name, getattr(self, name), top)
        if self.num_heads % self.num_kv_heads:
            raise ConfigFieldError(
                "num_heads", f"({self.num_heads}) is not a multiple of", "num_kv_heads", f" ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise ConfigFieldError("head_dim", f"must be even for RoPE, got {self.head_dim}")
        # Zero or negative values here give NaN or a division by zero in the forward pass; they are never meant.
        for name in ("norm_eps", "rope_theta", "rope_local_theta", "rope_scaling"):
            _check_number(name, getattr(self, name))
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            _check_number(name, getattr(self, name), optional=True)
        self._check_gemma4_fields()
        # One spelling per geometry: a full-layer width or kv-head count equal to the sliding layers' is no override.
        if self.full_head_dim == self.head_dim:
            self.full_head_dim = None
        if self.full_kv_heads == self.num_kv_heads:
            self.full_kv_heads = None
        for name in ("use_qk_norm", "sandwich_norms", "use_v_norm", "full_k_eq_v", "layer_scalar"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigFieldError(name, f"must be true or false, got {shown(getattr(self, name))}")
        if self.sliding_window is not None:
            check_size("sliding_window", self.sliding_window, MAX_POSITIONS)
        if self.hf_repo is not None and not isinstance(self.hf_repo, str):
            raise ConfigFieldError("hf_repo", f"must be a string, got {shown(self.hf_repo)}")

        if not isinstance(self.layer_types, (list, tuple)):
            raise ConfigFieldError("layer_types", f"must be a list, got {shown(self.layer_types)}")
        if not self.layer_types:
            self.layer_types = (FULL,) * self.num_layers
        self.layer_types = tuple(self.layer_types)
        if len(self.layer_types) != self.num_layers:
            raise ConfigFieldError(
                "layer_types", f"lists {len(self.layer_types)} layers, but", "num_layers", f" is {self.num_layers}"
            )
        bad = next((t for t in self.layer_types if t not in (SLIDING, FULL)), None)
        if bad is not None:
            raise ConfigFieldError(
                "layer_types", f"holds unknown layer type {shown(bad)} (expected {SLIDING!r} or {FULL!r})"
            )
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ConfigFieldError("sliding_window", "must be a positive integer: the model has sliding layers")
        shared = set(self.layer_types[self.first_shared :])
        if not shared <= set(self.layer_types[: self.first_shared]):
            raise ConfigFieldError(
                "kv_shared_layers",
                f"({self.kv_shared_layers}) leaves no earlier layer of kind {sorted(shared)[0]!r} to take K/V from",
            )

    def _check_gemma4_fields(self) -> None:
        if self.norm_offset not in (0.0, 1.0) or isinstance(self.norm_offset, bool):
            raise ConfigFieldError("norm_offset", f"must be 0 or 1, got {shown(self.norm_offset)}")
        _check_number("fixed_attn_scale", self.fixed_attn_scale, optional=True)
        if self.full_head_dim is not None:
            check_size("full_head_dim", self.full_head_dim, MAX_WIDTH)
            if self.full_head_dim % 2:
                raise ConfigFieldError("full_head_dim", f"must be even for RoPE, got {self.full_head_dim}")
        if self.full_kv_heads is not None:
            check_size("full_kv_heads", self.full_kv_heads, MAX_HEADS)
            if self.num_heads % self.full_kv_heads:
                raise ConfigFieldError(
                    "num_heads", f"({self.num_heads}) is not a multiple of", "full_kv_heads", f" ({self.full_kv_heads})"
                )
        rotated = self.rope_full_rotated
        if isinstance(rotated, bool) or not isinstance(rotated, (int, float)) or not 0 < rotated <= 1:
            raise ConfigFieldError("rope_full_rotated", f"must be a number in (0, 1], got {shown(rotated)}")
        for name in ("kv_shared_layers", "per_layer_input_size", "num_experts"):
            value = getattr(self, name)
            if value != 0 or isinstance(value, bool):
                check_size(name, value, MAX_LAYERS if name == "kv_shared_layers" else MAX_WIDTH)
        if self.kv_shared_layers >= self.num_layers:
            raise ConfigFieldError(
                "kv_shared_layers", f"({self.kv_shared_layers}) must be below", "num_layers", f" ({self.num_layers})"
            )
        if self.per_layer_vocab_size is not None:
            check_size("per_layer_vocab_size", self.per_layer_vocab_size, MAX_VOCAB)
        if self.num_experts:
            check_size("experts_per_token", self.experts_per_token, self.num_experts)
            check_size("expert_intermediate_size", self.expert_intermediate_size, MAX_WIDTH)
        elif self.experts_per_token or self.expert_intermediate_size:
            raise ConfigFieldError("experts_per_token", "is set, but", "num_experts", " is 0")
        if not isinstance(self.double_wide_mlp, bool):
            raise ConfigFieldError("double_wide_mlp", f"must be true or false, got {shown(self.double_wide_mlp)}")

    @property
    def attn_scale(self) -> float:
        """The factor applied to q @ k^T."""
        if self.fixed_attn_scale is not None:
            return self.fixed_attn_scale
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def head_dim_of(self, kind: str) -> int:
        """The per-head width of a layer of this kind (SLIDING or FULL)."""
        return (self.full_head_dim or self.head_dim) if kind == FULL else self.head_dim

    def kv_heads_of(self, kind: str) -> int:
        """The key/value heads of a layer of this kind."""
        return (self.full_kv_heads or self.num_kv_heads) if kind == FULL else self.num_kv_heads

    def has_v(self, kind: str) -> bool:
        """Whether a layer of this kind has its own value projection (not with keys-equal-values)."""
        return not (self.full_k_eq_v and kind == FULL)

    @property
    def first_shared(self) -> int:
        """The first layer that reuses another's keys and values (num_layers when none does)."""
        return self.num_layers - self.kv_shared_layers

    def reuses_kv(self, layer: int) -> bool:
        """Whether `layer` attends with the keys and values of an earlier layer (it has no k, v of its own and
        writes no cache)."""
        return layer >= self.first_shared

    def stores_kv(self, layer: int) -> bool:
        """Whether later layers attend with this layer's keys and values: the last layer of its kind before the
        first sharing one (when any layer shares)."""
        if not self.kv_shared_layers or self.reuses_kv(layer):
            return False
        kind = self.layer_types[layer]
        return kind not in self.layer_types[layer + 1 : self.first_shared]

    def intermediate_of(self, layer: int) -> int:
        """The dense MLP's inner width at `layer` (twice intermediate_size on KV-sharing layers with
        double_wide_mlp)."""
        return self.intermediate_size * (2 if self.double_wide_mlp and self.reuses_kv(layer) else 1)

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def fp16_overflows(self) -> bool:
        """Whether activations exceed fp16's largest value (65504) in this architecture, so that fp16 training
        turns into inf and NaN: Gemma 3's (and Gemma 4's) do; bf16 and fp32 have the range."""
        return self.generation >= 3

    @property
    def generation(self) -> int:
        """Which HF architecture family the fields describe (1 to 4), for export (and the fp16 rule) only."""
        if self.norm_offset == 0.0:
            return 4
        if self.use_qk_norm:
            return 3
        if self.sandwich_norms:
            return 2
        return 1

    # ---- native config.json -------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {"format": NATIVE_FORMAT, **dataclasses.asdict(self)}
        out["layer_types"] = list(self.layer_types)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str = "config") -> "GemmaConfig":
        data = {k: v for k, v in data.items() if k != "format"}
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise GemmaError(f"{where}: unknown field {unknown[0]!r}")
        try:
            return cls(**data)
        except ConfigFieldError as exc:
            raise exc.spelled(where, {}) from None
        except TypeError as exc:  # a required field left out
            raise GemmaError(f"{where}: {str(exc).removeprefix(cls.__name__ + '.__init__() ')}") from None


def pattern_layers(n: int, pattern: int) -> tuple[str, ...]:
    # Every `pattern`-th layer is global, the rest local: Gemma 2 alternates (2), starting with a local layer;
    # Gemma 3 has five local layers to each global one (6).
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))


# What every model of a generation shares; `layer_pattern` (every Nth layer global) becomes `layer_types`.
_GEMMA1 = dict(vocab_size=256000, max_seq_len=8192)
_GEMMA2 = dict(
    vocab_size=256000,
    attn_softcap=50.0,
    final_softcap=30.0,
    sandwich_norms=True,
    sliding_window=4096,
    max_seq_len=8192,
    layer_pattern=2,
)
_GEMMA3 = dict(
    rope_theta=1_000_000.0, rope_local_theta=10_000.0, use_qk_norm=True, sandwich_norms=True, layer_pattern=6
)
_GEMMA3_SMALL = dict(_GEMMA3, vocab_size=262144, sliding_window=512, max_seq_len=32768)  # 270m, 1b: text only
_GEMMA3_LARGE = dict(_GEMMA3, vocab_size=262208, sliding_window=1024, max_seq_len=131072, rope_scaling=8.0)

# Gemma 4: RMSNorm by w, attention scale 1 (q/k norms set the size), a weightless v norm, 256-wide heads on sliding
# layers and 512-wide ones with proportional RoPE (a quarter of the pairs turn) on full layers, layer scalars.
_GEMMA4 = dict(
    vocab_size=262144,
    head_dim=256,
    full_head_dim=512,
    rope_theta=1_000_000.0,
    rope_local_theta=10_000.0,
    rope_full_rotated=0.25,
    final_softcap=30.0,
    use_qk_norm=True,
    sandwich_norms=True,
    norm_offset=0.0,
    fixed_attn_scale=1.0,
    use_v_norm=True,
    layer_scalar=True,
)
# E2B and E4B (128K context, window 512): per-layer embeddings and KV-sharing layers; 12B, 26B-A4B and 31B (256K,
# window 1024): keys-equal-values full layers with their own kv-head count.
_GEMMA4_E = dict(_GEMMA4, sliding_window=512, max_seq_len=131072, per_layer_input_size=256, per_layer_vocab_size=262144)
_GEMMA4_LARGE = dict(_GEMMA4, sliding_window=1024, max_seq_len=262144, full_k_eq_v=True, layer_pattern=6)

# Each preset mirrors the public config.json of the repo it names, https://huggingface.co/<hf_repo>/blob/main/
# config.json (for the multimodal Gemma 3 sizes, its `text_config`), as GemmaConfig keywords.
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "2b": dict(
        _GEMMA1,
        hf_repo="google/gemma-2b",
        hidden_size=2048,
        intermediate_size=16384,
        num_layers=18,
        num_heads=8,
        num_kv_heads=1,
        head_dim=256,
    ),
    "7b": dict(
        _GEMMA1,
        hf_repo="google/gemma-7b",
        hidden_size=3072,
        intermediate_size=24576,
        num_layers=28,
        num_heads=16,
        num_kv_heads=16,
        head_dim=256,
    ),
    "2-2b": dict(
        _GEMMA2,
        hf_repo="google/gemma-2-2b",
        hidden_size=2304,
        intermediate_size=9216,
        num_layers=26,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "2-9b": dict(
        _GEMMA2,
        hf_repo="google/gemma-2-9b",
        hidden_size=3584,
        intermediate_size=14336,
        num_layers=42,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "2-27b": dict(
        _GEMMA2,
        hf_repo="google/gemma-2-27b",
        hidden_size=4608,
        intermediate_size=36864,
        num_layers=46,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=144,
    ),
    "3-270m": dict(
        _GEMMA3_SMALL,
        hf_repo="google/gemma-3-270m",
        hidden_size=640,
        intermediate_size=2048,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "3-1b": dict(
        _GEMMA3_SMALL,
        hf_repo="google/gemma-3-1b-pt",
        hidden_size=1152,
        intermediate_size=6912,
        num_layers=26,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "3-4b": dict(
        _GEMMA3_LARGE,
        hf_repo="google/gemma-3-4b-pt",
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=34,
        num_heads=8,
        num_kv_heads=4,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "3-12b": dict(
        _GEMMA3_LARGE,
        hf_repo="google/gemma-3-12b-pt",
        hidden_size=3840,
        intermediate_size=15360,
        num_layers=48,
        num_heads=16,
        num_kv_heads=8,
        head_dim=256,
        query_pre_attn_scalar=256,
    ),
    "3-27b": dict(
        _GEMMA3_LARGE,
        hf_repo="google/gemma-3-27b-pt",
        hidden_size=5376,
        intermediate_size=21504,
        num_layers=62,
        num_heads=32,
        num_kv_heads=16,
        head_dim=128,
        query_pre_attn_scalar=168,
    ),
    # Gemma 4 (text_config of each repo's config.json; 4-12b's is a gemma4_unified one). Their text parameter
    # counts are the published ones: 4.63B (2.35B of them the per-layer table), 7.46B, 11.91B, 25.23B, 30.70B.
    "4-e2b": dict(
        _GEMMA4_E,
        hf_repo="google/gemma-4-E2B",
        hidden_size=1536,
        intermediate_size=6144,
        double_wide_mlp=True,  # 12288 on the 20 KV-sharing layers
        num_layers=35,
        num_heads=8,
        num_kv_heads=1,
        kv_shared_layers=20,
        layer_pattern=5,
    ),
    "4-e4b": dict(
        _GEMMA4_E,
        hf_repo="google/gemma-4-E4B",
        hidden_size=2560,
        intermediate_size=10240,
        num_layers=42,
        num_heads=8,
        num_kv_heads=2,
        kv_shared_layers=18,
        layer_pattern=6,
    ),
    "4-12b": dict(
        _GEMMA4_LARGE,
        hf_repo="google/gemma-4-12B",
        hidden_size=3840,
        intermediate_size=15360,
        num_layers=48,
        num_heads=16,
        num_kv_heads=8,
        full_kv_heads=1,
    ),
    "4-26b-a4b": dict(
        _GEMMA4_LARGE,
        hf_repo="google/gemma-4-26B-A4B",
        hidden_size=2816,
        intermediate_size=2112,
        num_layers=30,
        num_heads=16,
        num_kv_heads=8,
        full_kv_heads=2,
        num_experts=128,
        experts_per_token=8,
        expert_intermediate_size=704,
    ),
    "4-31b": dict(
        _GEMMA4_LARGE,
        hf_repo="google/gemma-4-31B",
        hidden_size=5376,
        intermediate_size=21504,
        num_layers=60,
        num_heads=32,
        num_kv_heads=16,
        full_kv_heads=4,
    ),
}
PRESETS = tuple(PRESET_CONFIGS)


def preset(name: str) -> GemmaConfig:
    """The architecture of a named model (`2b 7b 2-2b 2-9b 2-27b 3-270m 3-1b 3-4b 3-12b 3-27b`, and Gemma 4's
    `4-e2b 4-e4b 4-12b 4-26b-a4b 4-31b`)."""
    if name not in PRESET_CONFIGS:
        raise GemmaError(f"unknown model size {name!r}; choose one of {' '.join(PRESETS)}")
    fields = dict(PRESET_CONFIGS[name])
    pattern = fields.pop("layer_pattern", None)
    if pattern is not None:
        fields["layer_types"] = pattern_layers(fields["num_layers"], pattern)
    return GemmaConfig(**fields)
