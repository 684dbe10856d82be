"""The model configuration: one dataclass whose fields describe the architecture, presets as data.

Behaviour follows the fields (`attn_softcap`, `use_qk_norm`, `sliding_window`, ...), never a model's name.
`from_hf_config` reads the `config.json` of every Gemma text generation, in the shape the hub publishes (written
by transformers 4.x) and in the shape transformers 5.x writes; `to_hf_config` writes the hub's shape.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gemma.errors import GemmaError
from gemma.files import read_json_file

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
_SIZES = {"vocab_size": MAX_VOCAB, "hidden_size": MAX_WIDTH, "intermediate_size": MAX_WIDTH,
          "num_layers": MAX_LAYERS, "num_heads": MAX_HEADS, "num_kv_heads": MAX_HEADS, "head_dim": MAX_WIDTH,
          "max_seq_len": MAX_POSITIONS}


def shown(value: Any, limit: int = 60) -> str:
    """repr(value), cut short: a message built from a file must stay one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _is_finite(value: Any) -> bool:
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
    if not _is_finite(value) or value <= 0:
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

    def __post_init__(self):
        # Sizes first, bounded: everything after (the layer list here, the model's tables later) is built from them.
        for name, top in _SIZES.items():
            check_size(name, getattr(self, name), top)
        if self.num_heads % self.num_kv_heads:
            raise ConfigFieldError("num_heads", f"({self.num_heads}) is not a multiple of", "num_kv_heads",
                                   f" ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigFieldError("head_dim", f"must be even for RoPE, got {self.head_dim}")
        # Zero or negative values here give NaN or a division by zero in the forward pass; they are never meant.
        for name in ("norm_eps", "rope_theta", "rope_local_theta", "rope_scaling"):
            _check_number(name, getattr(self, name))
        for name in ("query_pre_attn_scalar", "attn_softcap", "final_softcap"):
            _check_number(name, getattr(self, name), optional=True)
        for name in ("use_qk_norm", "sandwich_norms"):
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
            raise ConfigFieldError("layer_types", f"lists {len(self.layer_types)} layers, but", "num_layers",
                                   f" is {self.num_layers}")
        bad = next((t for t in self.layer_types if t not in (SLIDING, FULL)), None)
        if bad is not None:
            raise ConfigFieldError("layer_types", f"holds unknown layer type {shown(bad)} "
                                   f"(expected {SLIDING!r} or {FULL!r})")
        if SLIDING in self.layer_types and self.sliding_window is None:
            raise ConfigFieldError("sliding_window", "must be a positive integer: the model has sliding layers")

    @property
    def attn_scale(self) -> float:
        """The factor applied to q @ k^T."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def generation(self) -> int:
        """Which HF architecture family the fields describe (1, 2 or 3), for export only."""
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

    # ---- HF config.json -----------------------------------------------------------------------------------------

    @classmethod
    def from_hf_config(cls, hf: dict[str, Any], where: str = "config.json") -> "GemmaConfig":
        return from_hf_config(hf, where)

    def to_hf_config(self, **token_ids: int) -> dict[str, Any]:
        return to_hf_config(self, **token_ids)


def pattern_layers(n: int, pattern: int) -> tuple[str, ...]:
    # Every `pattern`-th layer is global, the rest local: Gemma 2 alternates (2), starting with a local layer;
    # Gemma 3 has five local layers to each global one (6).
    return tuple(SLIDING if (i + 1) % pattern else FULL for i in range(n))


# What every model of a generation shares; `layer_pattern` (every Nth layer global) becomes `layer_types`.
_GEMMA1 = dict(vocab_size=256000, max_seq_len=8192)
_GEMMA2 = dict(vocab_size=256000, attn_softcap=50.0, final_softcap=30.0, sandwich_norms=True, sliding_window=4096,
               max_seq_len=8192, layer_pattern=2)
_GEMMA3 = dict(rope_theta=1_000_000.0, rope_local_theta=10_000.0, use_qk_norm=True, sandwich_norms=True,
               layer_pattern=6)
_GEMMA3_SMALL = dict(_GEMMA3, vocab_size=262144, sliding_window=512, max_seq_len=32768)  # 270m, 1b: text only
_GEMMA3_LARGE = dict(_GEMMA3, vocab_size=262208, sliding_window=1024, max_seq_len=131072, rope_scaling=8.0)

# Each preset mirrors the public config.json of the repo it names, https://huggingface.co/<hf_repo>/blob/main/
# config.json (for the multimodal Gemma 3 sizes, its `text_config`), as GemmaConfig keywords.
PRESET_CONFIGS: dict[str, dict[str, Any]] = {
    "2b": dict(_GEMMA1, hf_repo="google/gemma-2b", hidden_size=2048, intermediate_size=16384, num_layers=18,
               num_heads=8, num_kv_heads=1, head_dim=256),
    "7b": dict(_GEMMA1, hf_repo="google/gemma-7b", hidden_size=3072, intermediate_size=24576, num_layers=28,
               num_heads=16, num_kv_heads=16, head_dim=256),
    "2-2b": dict(_GEMMA2, hf_repo="google/gemma-2-2b", hidden_size=2304, intermediate_size=9216, num_layers=26,
                 num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "2-9b": dict(_GEMMA2, hf_repo="google/gemma-2-9b", hidden_size=3584, intermediate_size=14336, num_layers=42,
                 num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "2-27b": dict(_GEMMA2, hf_repo="google/gemma-2-27b", hidden_size=4608, intermediate_size=36864, num_layers=46,
                  num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=144),
    "3-270m": dict(_GEMMA3_SMALL, hf_repo="google/gemma-3-270m", hidden_size=640, intermediate_size=2048,
                   num_layers=18, num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256),
    "3-1b": dict(_GEMMA3_SMALL, hf_repo="google/gemma-3-1b-pt", hidden_size=1152, intermediate_size=6912,
                 num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, query_pre_attn_scalar=256),
    "3-4b": dict(_GEMMA3_LARGE, hf_repo="google/gemma-3-4b-pt", hidden_size=2560, intermediate_size=10240,
                 num_layers=34, num_heads=8, num_kv_heads=4, head_dim=256, query_pre_attn_scalar=256),
    "3-12b": dict(_GEMMA3_LARGE, hf_repo="google/gemma-3-12b-pt", hidden_size=3840, intermediate_size=15360,
                  num_layers=48, num_heads=16, num_kv_heads=8, head_dim=256, query_pre_attn_scalar=256),
    "3-27b": dict(_GEMMA3_LARGE, hf_repo="google/gemma-3-27b-pt", hidden_size=5376, intermediate_size=21504,
                  num_layers=62, num_heads=32, num_kv_heads=16, head_dim=128, query_pre_attn_scalar=168),
}
PRESETS = tuple(PRESET_CONFIGS)


def preset(name: str) -> GemmaConfig:
    """The architecture of a named model (`2b 7b 2-2b 2-9b 2-27b 3-270m 3-1b 3-4b 3-12b 3-27b`)."""
    if name not in PRESET_CONFIGS:
        raise GemmaError(f"unknown model size {name!r}; choose one of {' '.join(PRESETS)}")
    fields = dict(PRESET_CONFIGS[name])
    pattern = fields.pop("layer_pattern", None)
    if pattern is not None:
        fields["layer_types"] = pattern_layers(fields["num_layers"], pattern)
    return GemmaConfig(**fields)


# ---- reading HF config.json ---------------------------------------------------------------------------------------

# transformers' defaults for keys a config.json may leave out (the hub's multimodal Gemma 3 configs list only the
# text settings that differ from these). Taken from the configuration classes of transformers 4.x and 5.x.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
                  num_attention_heads=16, num_key_value_heads=16, head_dim=256, max_position_embeddings=8192,
                  rms_norm_eps=1e-6, rope_theta=10000.0),
    "gemma2": dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                   num_attention_heads=8, num_key_value_heads=4, head_dim=256, max_position_embeddings=8192,
                   rms_norm_eps=1e-6, rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                   final_logit_softcapping=30.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216, num_hidden_layers=26,
                        num_attention_heads=8, num_key_value_heads=4, head_dim=256,
                        max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
                        rope_local_base_freq=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                        sliding_window_pattern=6, final_logit_softcapping=None, attn_logit_softcapping=None),
}
_HF_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}
_GELU_TANH = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"}  # "gelu" is the legacy name of tanh GELU


# Our field -> the config.json key it is read from, so that an error names the key the user can find in the file.
HF_FIELDS = {"num_layers": "num_hidden_layers", "num_heads": "num_attention_heads",
             "num_kv_heads": "num_key_value_heads", "norm_eps": "rms_norm_eps", "rope_local_theta":
             "rope_local_base_freq", "rope_scaling": "rope_scaling.factor", "attn_softcap": "attn_logit_softcapping",
             "final_softcap": "final_logit_softcapping", "max_seq_len": "max_position_embeddings",
             "hf_repo": "_name_or_path"}


def _hf_number(value: Any, key: str, where: str, kind: type = float) -> int | float:
    """A number from config.json (`kind` int: a whole number), or a one-line error naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GemmaError(f"{where}: field {key!r} must be a number, got {shown(value)}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():  # also NaN and infinities
            raise GemmaError(f"{where}: field {key!r} must be an integer, got {shown(value)}")
        return int(value)
    if not _is_finite(value):
        raise GemmaError(f"{where}: field {key!r} must be a finite number, got {shown(value)}")
    return float(value)


def _rope_from_params(params: Any, where: str, key: str, what: str) -> tuple[float | None, float]:
    """(theta, linear factor) from one rope_scaling / rope_parameters entry (`key` names it in messages)."""
    if not params:
        return None, 1.0
    if not isinstance(params, dict):
        raise GemmaError(f"{where}: field {key!r} must be an object, got {shown(params)}")
    kind = params.get("rope_type", params.get("type", "default"))
    theta = params.get("rope_theta")
    if theta is not None:
        theta = _hf_number(theta, f"{key}.rope_theta", where)
    if kind == "default":
        return theta, 1.0
    if kind == "linear":
        return theta, _hf_number(params.get("factor"), f"{key}.factor", where)
    raise GemmaError(f"{where}: unsupported RoPE type {shown(kind)} for {what} layers (supported: default, linear)")


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> GemmaConfig:
    """A GemmaConfig from an HF config.json (any Gemma text generation, transformers 4.x or 5.x shape)."""
    try:
        return _from_hf_config(hf, where)
    except ConfigFieldError as exc:  # the dataclass's own checks, named as config.json spells the field
        raise exc.spelled(where, HF_FIELDS) from None
    except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as exc:
        raise GemmaError(f"{where}: malformed field ({type(exc).__name__}: {exc})") from None


def _from_hf_config(hf: dict[str, Any], where: str) -> GemmaConfig:
    if not isinstance(hf, dict):
        raise GemmaError(f"{where}: expected a JSON object")
    model_type = hf.get("model_type")
    if model_type == "gemma3" or "text_config" in hf:
        # Multimodal Gemma 3: the text tower's settings sit under text_config.
        text = hf.get("text_config") or {}
        if not isinstance(text, dict):
            raise GemmaError(f"{where}: field 'text_config' must be an object, got {shown(text)}")
        text = {"model_type": "gemma3_text", **text}
        return _from_hf_config(text, where + ":text_config")
    if not isinstance(model_type, str) or model_type not in _HF_DEFAULTS:
        raise GemmaError(f"{where}: model_type {shown(model_type)} is not a Gemma text model "
                         f"(expected one of {', '.join(_HF_DEFAULTS)}, or gemma3)")
    c = {**_HF_DEFAULTS[model_type], **{k: v for k, v in hf.items() if v is not None or k.endswith("softcapping")}}
    _check_supported(c, where)

    def num(key: str, kind: type = int) -> int | float:
        return _hf_number(c.get(key), key, where, kind)

    def opt(key: str) -> float | None:
        return None if c.get(key) is None else num(key, float)

    # Bounded before anything is built from it (the layer list below, the model's tables later).
    n = check_size("num_layers", num("num_hidden_layers"), MAX_LAYERS)
    layer_types = _hf_layer_types(c, hf, model_type, n, where)
    theta, local_theta, scaling = _hf_rope(c, model_type, where)
    heads = check_size("num_heads", num("num_attention_heads"), MAX_HEADS)  # divides hidden_size below
    name = hf.get("_name_or_path")
    return GemmaConfig(
        vocab_size=num("vocab_size"),
        hidden_size=num("hidden_size"),
        intermediate_size=num("intermediate_size"),
        num_layers=n,
        num_heads=heads,
        num_kv_heads=num("num_key_value_heads"),
        head_dim=num("head_dim") if c.get("head_dim") else num("hidden_size") // heads,
        norm_eps=num("rms_norm_eps", float),
        rope_theta=theta,
        rope_local_theta=local_theta,
        rope_scaling=scaling,
        query_pre_attn_scalar=opt("query_pre_attn_scalar") if model_type != "gemma" else None,
        attn_softcap=opt("attn_logit_softcapping"),
        final_softcap=opt("final_logit_softcapping"),
        use_qk_norm=model_type == "gemma3_text",
        sandwich_norms=model_type in ("gemma2", "gemma3_text"),
        sliding_window=num("sliding_window") if SLIDING in layer_types else None,
        layer_types=layer_types,
        max_seq_len=num("max_position_embeddings"),
        hf_repo=name if isinstance(name, str) and name else None,  # informational: anything else is dropped
    )


def _check_supported(c: dict[str, Any], where: str) -> None:
    """Refuse the settings that no Gemma text checkpoint has and our model does not implement."""
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if not isinstance(act, str) or act not in _GELU_TANH:
        raise GemmaError(f"{where}: unsupported activation {shown(act)} (Gemma uses tanh-approximated GELU)")
    if c.get("attention_bias"):
        raise GemmaError(f"{where}: attention_bias is not supported (no Gemma checkpoint uses it)")
    if c.get("use_bidirectional_attention"):
        raise GemmaError(f"{where}: use_bidirectional_attention (embedding models) is not supported")
    if c.get("tie_word_embeddings") is False:
        raise GemmaError(f"{where}: untied embeddings are not supported (Gemma ties the output head)")


def _hf_layer_types(c: dict[str, Any], hf: dict[str, Any], model_type: str, n: int, where: str) -> tuple[str, ...]:
    """Which layers slide: transformers 5.x writes layer_types; 4.x configs imply them."""
    if c.get("layer_types"):
        types = c["layer_types"]
        if not isinstance(types, list) or not all(isinstance(t, str) for t in types):
            raise GemmaError(f"{where}: field 'layer_types' must be a list of strings, got {shown(types)}")
        unknown = next((t for t in types if t not in _HF_LAYER_TYPES), None)
        if unknown is not None:
            raise GemmaError(f"{where}: field 'layer_types': unknown layer type {shown(unknown)}")
        return tuple(_HF_LAYER_TYPES[t] for t in types)
    if model_type == "gemma2":
        return pattern_layers(n, 2)
    if model_type == "gemma3_text":
        # The file's own key first (4.5x writes it with an underscore), then transformers' default of 6.
        key = next((k for k in ("sliding_window_pattern", "_sliding_window_pattern") if hf.get(k) is not None),
                   "sliding_window_pattern")
        pattern = _hf_number(c.get(key), key, where, int)
        if pattern <= 0:
            raise GemmaError(f"{where}: field {key!r} must be a positive integer, got {pattern}")
        return pattern_layers(n, pattern)
    return (FULL,) * n


def _hf_rope(c: dict[str, Any], model_type: str, where: str) -> tuple[float, float, float]:
    """(theta, local theta, linear scaling of the full-attention layers). 5.x nests per layer type under
    rope_parameters; 4.x has rope_theta, rope_local_base_freq, rope_scaling."""
    theta = _hf_number(c["rope_theta"], "rope_theta", where) if "rope_theta" in c else 10000.0
    local_theta = (_hf_number(c["rope_local_base_freq"], "rope_local_base_freq", where)
                   if "rope_local_base_freq" in c else theta)
    scaling = 1.0
    rp = c.get("rope_parameters")
    if rp and isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        t, scaling = _rope_from_params(rp.get("full_attention"), where, "rope_parameters.full_attention",
                                       "full-attention")
        theta = t if t is not None else theta
        t, local_scaling = _rope_from_params(rp.get("sliding_attention"), where, "rope_parameters.sliding_attention",
                                             "sliding-window")
        local_theta = t if t is not None else local_theta
        if local_scaling != 1.0:
            raise GemmaError(f"{where}: RoPE scaling on sliding-window layers is not supported")
    elif rp:
        t, scaling = _rope_from_params(rp, where, "rope_parameters", "all")
        theta = t if t is not None else theta
        if model_type != "gemma3_text":
            local_theta = theta
    if c.get("rope_scaling"):
        _, scaling = _rope_from_params(c["rope_scaling"], where, "rope_scaling", "full-attention")
    return theta, local_theta, scaling


def to_hf_config(cfg: GemmaConfig, bos_token_id: int = 2, eos_token_id: int = 1,
                 pad_token_id: int = 0) -> dict[str, Any]:
    """An HF config.json in the hub's shape (transformers 4.x keys, which 5.x reads too)."""
    gen = cfg.generation
    model_type, arch = {1: ("gemma", "GemmaForCausalLM"), 2: ("gemma2", "Gemma2ForCausalLM"),
                        3: ("gemma3_text", "Gemma3ForCausalLM")}[gen]
    out: dict[str, Any] = {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "bos_token_id": bos_token_id,
        "eos_token_id": eos_token_id,
        "pad_token_id": pad_token_id,
        "torch_dtype": "float32",
    }
    if gen == 1:
        if cfg.rope_local_theta != cfg.rope_theta or cfg.rope_scaling != 1.0 or SLIDING in cfg.layer_types \
                or cfg.attn_softcap or cfg.final_softcap or cfg.query_pre_attn_scalar not in (None, cfg.head_dim):
            raise GemmaError("this architecture has no HF Gemma 1 equivalent")
        out["hidden_act"] = "gelu_pytorch_tanh"
        return out
    scalar = cfg.query_pre_attn_scalar or cfg.head_dim
    out["query_pre_attn_scalar"] = int(scalar) if scalar == int(scalar) else scalar  # transformers wants an int
    out["sliding_window"] = cfg.sliding_window or cfg.max_seq_len
    out["attn_logit_softcapping"] = cfg.attn_softcap
    out["final_logit_softcapping"] = cfg.final_softcap
    out["layer_types"] = [("sliding_attention" if t == SLIDING else "full_attention") for t in cfg.layer_types]
    if gen == 2:
        if cfg.rope_local_theta != cfg.rope_theta or cfg.rope_scaling != 1.0:
            raise GemmaError("this architecture has no HF Gemma 2 equivalent (per-layer RoPE)")
        out["cache_implementation"] = "hybrid"
        return out
    out["rope_local_base_freq"] = cfg.rope_local_theta
    out["rope_scaling"] = ({"rope_type": "linear", "factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0
                           else None)
    return out


def read_json(path: Path, what: str = "file") -> dict[str, Any]:
    """A JSON object from a regular file, or a one-line error naming the file once: a folder, FIFO or device where
    the file belongs, text that is not UTF-8 or not JSON, and JSON nested too deeply for the parser are refused
    (`gemma.files.read_json_file`)."""
    data = read_json_file(path, what)
    if not isinstance(data, dict):
        raise GemmaError(f"{path}: expected a JSON object")
    return data
