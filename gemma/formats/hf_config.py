"""HF's config.json, read into a GemmaConfig and written from one: `from_hf_config` accepts what transformers'
Gemma, Gemma 2 and Gemma 3 configuration classes write (4.x and 5.x spellings, the multimodal Gemma 3 wrapper's
text_config, transformers' defaults for keys left out), strictly: anything we cannot run is a GemmaError naming the
key. `HF_FIELDS` spells our fields as config.json does, for messages."""

from __future__ import annotations

from typing import Any

from gemma.errors import GemmaError
from gemma.formats import hf_gemma4
from gemma.model.config import (
    FULL,
    MAX_HEADS,
    MAX_LAYERS,
    SLIDING,
    ConfigFieldError,
    GemmaConfig,
    check_size,
    is_finite,
    pattern_layers,
    shown,
)


# ---- reading HF config.json ---------------------------------------------------------------------------------------

# transformers' defaults for keys a config.json may leave out (the hub's multimodal Gemma 3 configs list only the
# text settings that differ from these). Taken from the configuration classes of transformers 4.x and 5.x.
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(
        vocab_size=256000,
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
    ),
    "gemma2": dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=8192,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "gemma3_text": dict(
        vocab_size=262208,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
        max_position_embeddings=131072,
        rms_norm_eps=1e-6,
        rope_theta=1_000_000.0,
        rope_local_base_freq=10000.0,
        query_pre_attn_scalar=256,
        sliding_window=4096,
        sliding_window_pattern=6,
        final_logit_softcapping=None,
        attn_logit_softcapping=None,
    ),
}
_HF_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}
_GELU_TANH = {"gelu_pytorch_tanh", "gelu_new", "gelu_fast", "gelu"}  # "gelu" is the legacy name of tanh GELU


# Our field -> the config.json key it is read from, so that an error names the key the user can find in the file.
HF_FIELDS = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
    "norm_eps": "rms_norm_eps",
    "rope_local_theta": "rope_local_base_freq",
    "rope_scaling": "rope_scaling.factor",
    "attn_softcap": "attn_logit_softcapping",
    "final_softcap": "final_logit_softcapping",
    "max_seq_len": "max_position_embeddings",
    "hf_repo": "_name_or_path",
    # Gemma 4's
    "kv_shared_layers": "num_kv_shared_layers",
    "double_wide_mlp": "use_double_wide_mlp",
    "per_layer_input_size": "hidden_size_per_layer_input",
    "per_layer_vocab_size": "vocab_size_per_layer_input",
    "experts_per_token": "top_k_experts",
    "expert_intermediate_size": "moe_intermediate_size",
}


def _hf_number(value: Any, key: str, where: str, kind: type = float) -> int | float:
    """A number from config.json (`kind` int: a whole number), or a one-line error naming the key."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise GemmaError(f"{where}: field {key!r} must be a number, got {shown(value)}")
    if kind is int:
        if isinstance(value, float) and not value.is_integer():  # also NaN and infinities
            raise GemmaError(f"{where}: field {key!r} must be an integer, got {shown(value)}")
        return int(value)
    if not is_finite(value):
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
    if model_type in _MULTIMODAL or "text_config" in hf:
        # Multimodal Gemma 3 and 4: the text tower's settings sit under text_config.
        text = hf.get("text_config") or {}
        if not isinstance(text, dict):
            raise GemmaError(f"{where}: field 'text_config' must be an object, got {shown(text)}")
        text = {"model_type": _MULTIMODAL.get(model_type, "gemma3_text"), **text}
        return _from_hf_config(text, where + ":text_config")
    if model_type in hf_gemma4.DEFAULTS:
        given = {k: v for k, v in hf.items() if v is not None or k.endswith("softcapping")}
        c = {**hf_gemma4.DEFAULTS[model_type], **given}
        _check_supported(c, where)
        return hf_gemma4.from_gemma4_config(c, lambda key, kind=int: _hf_number(c.get(key), key, where, kind), where)
    if not isinstance(model_type, str) or model_type not in _HF_DEFAULTS:
        raise GemmaError(
            f"{where}: model_type {shown(model_type)} is not a Gemma text model "
            f"(expected one of {', '.join([*_HF_DEFAULTS, *hf_gemma4.DEFAULTS, *_MULTIMODAL])})"
        )
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


# Multimodal model_type -> its text_config's.
_MULTIMODAL = {"gemma3": "gemma3_text", "gemma4": "gemma4_text", "gemma4_unified": "gemma4_unified_text"}


def _check_supported(c: dict[str, Any], where: str) -> None:
    """Refuse the settings that no Gemma text checkpoint has and our model does not implement."""
    act = c.get("hidden_activation") or c.get("hidden_act") or "gelu_pytorch_tanh"
    if not isinstance(act, str) or act not in _GELU_TANH:
        raise GemmaError(f"{where}: unsupported activation {shown(act)} (Gemma uses tanh-approximated GELU)")
    if c.get("attention_bias"):
        raise GemmaError(f"{where}: attention_bias is not supported (no Gemma checkpoint uses it)")
    # "vision" (Gemma 4 12B and up) only joins image tokens' attention: no effect on text.
    if c.get("use_bidirectional_attention") not in (None, False, "vision"):
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
        key = next(
            (k for k in ("sliding_window_pattern", "_sliding_window_pattern") if hf.get(k) is not None),
            "sliding_window_pattern",
        )
        pattern = _hf_number(c.get(key), key, where, int)
        if pattern <= 0:
            raise GemmaError(f"{where}: field {key!r} must be a positive integer, got {pattern}")
        return pattern_layers(n, pattern)
    return (FULL,) * n


def _hf_rope(c: dict[str, Any], model_type: str, where: str) -> tuple[float, float, float]:
    """(theta, local theta, linear scaling of the full-attention layers). 5.x nests per layer type under
    rope_parameters; 4.x has rope_theta, rope_local_base_freq, rope_scaling."""
    theta = _hf_number(c["rope_theta"], "rope_theta", where) if "rope_theta" in c else 10000.0
    local_theta = (
        _hf_number(c["rope_local_base_freq"], "rope_local_base_freq", where) if "rope_local_base_freq" in c else theta
    )
    scaling = 1.0
    rp = c.get("rope_parameters")
    if rp and isinstance(rp, dict) and ("full_attention" in rp or "sliding_attention" in rp):
        t, scaling = _rope_from_params(
            rp.get("full_attention"), where, "rope_parameters.full_attention", "full-attention"
        )
        theta = t if t is not None else theta
        t, local_scaling = _rope_from_params(
            rp.get("sliding_attention"), where, "rope_parameters.sliding_attention", "sliding-window"
        )
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


def to_hf_config(
    cfg: GemmaConfig, bos_token_id: int = 2, eos_token_id: int = 1, pad_token_id: int = 0
) -> dict[str, Any]:
    """An HF config.json in the hub's shape (transformers 4.x keys, which 5.x reads too)."""
    gen = cfg.generation
    if gen == 4:
        ids = {"bos_token_id": bos_token_id, "eos_token_id": eos_token_id, "pad_token_id": pad_token_id}
        return hf_gemma4.to_gemma4_config(cfg, ids)
    gemma4_only = (cfg.fixed_attn_scale, cfg.use_v_norm, cfg.full_head_dim, cfg.full_kv_heads, cfg.full_k_eq_v)
    if any(gemma4_only) or cfg.rope_full_rotated != 1.0 or cfg.layer_scalar:
        raise GemmaError(f"this architecture has no HF Gemma {gen} equivalent (it has Gemma 4's features)")
    model_type, arch = {
        1: ("gemma", "GemmaForCausalLM"),
        2: ("gemma2", "Gemma2ForCausalLM"),
        3: ("gemma3_text", "Gemma3ForCausalLM"),
    }[gen]
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
        if (
            cfg.rope_local_theta != cfg.rope_theta
            or cfg.rope_scaling != 1.0
            or SLIDING in cfg.layer_types
            or cfg.attn_softcap
            or cfg.final_softcap
            or cfg.query_pre_attn_scalar not in (None, cfg.head_dim)
        ):
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
    out["rope_scaling"] = {"rope_type": "linear", "factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0 else None
    return out
