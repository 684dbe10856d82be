"""HF's config.json of a Gemma 4 text decoder (`gemma4_text`, or the text_config of the multimodal `gemma4`) as a
GemmaConfig, in both shapes transformers writes: the hub's (`global_head_dim`, `num_global_key_value_heads`) and
5.24's (`per_layer_config`, one entry per full-attention layer), and back in 5.24's shape. hf_config's own checks
refuse what our model does not implement (bidirectional attention).
"""

from __future__ import annotations

from typing import Any, Callable

from gemma.errors import GemmaError
from gemma.model.config import FULL, MAX_HEADS, MAX_LAYERS, MAX_WIDTH, SLIDING, GemmaConfig, check_size, shown

# transformers 5.24's defaults for keys a config.json leaves out: Gemma4TextConfig's (E2B, E4B, 26B-A4B, 31B) and
# Gemma4UnifiedTextConfig's (12B: the same decoder without per-layer embeddings or experts).
_TEXT: dict[str, Any] = dict(
    vocab_size=262144,
    hidden_size=2304,
    intermediate_size=9216,
    num_hidden_layers=30,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=256,
    global_head_dim=512,
    max_position_embeddings=131072,
    rms_norm_eps=1e-6,
    sliding_window=512,
    attention_k_eq_v=False,
    hidden_size_per_layer_input=256,  # a gemma4_text config.json without the key has PLE
    vocab_size_per_layer_input=262144,
    num_kv_shared_layers=0,
    use_double_wide_mlp=False,
    enable_moe_block=False,
)
_UNIFIED = {**_TEXT, "max_position_embeddings": 262144, "sliding_window": 1024, "hidden_size_per_layer_input": 0}
DEFAULTS: dict[str, dict[str, Any]] = {"gemma4_text": _TEXT, "gemma4_unified_text": _UNIFIED}
_LAYER_TYPES = {"sliding_attention": SLIDING, "full_attention": FULL}


def from_gemma4_config(c: dict[str, Any], number: Callable[..., Any], where: str) -> GemmaConfig:
    """A GemmaConfig from a gemma4_text config (`c`, the file's keys over DEFAULTS); `number(key, kind)` reads a
    number or fails naming the key."""
    n = check_size("num_layers", number("num_hidden_layers"), MAX_LAYERS)
    types = layer_types(c, n, where)
    full_head_dim, full_kv = full_geometry(c, types, number, where)
    full_rope, local_rope = rope(c, where)
    ple = _count(c, "hidden_size_per_layer_input", number)
    moe = _flag(c, "enable_moe_block", where)
    shared = _count(c, "num_kv_shared_layers", number)
    if shared >= n:
        raise GemmaError(
            f"{where}: num_kv_shared_layers ({shared}) leaves no layer that makes its own keys and values "
            f"(of {n}; a drafter that reads another model's is not supported)"
        )
    return GemmaConfig(
        vocab_size=number("vocab_size"),
        hidden_size=number("hidden_size"),
        intermediate_size=number("intermediate_size"),
        num_layers=n,
        num_heads=check_size("num_heads", number("num_attention_heads"), MAX_HEADS),
        num_kv_heads=number("num_key_value_heads"),
        head_dim=number("head_dim"),
        norm_eps=number("rms_norm_eps", float),
        rope_theta=full_rope["rope_theta"],
        rope_local_theta=local_rope["rope_theta"],
        rope_scaling=full_rope["factor"],
        final_softcap=None if c.get("final_logit_softcapping") is None else number("final_logit_softcapping", float),
        use_qk_norm=True,
        sandwich_norms=True,
        sliding_window=number("sliding_window") if SLIDING in types else None,
        layer_types=types,
        max_seq_len=number("max_position_embeddings"),
        norm_offset=0.0,
        fixed_attn_scale=1.0,
        use_v_norm=True,
        full_head_dim=full_head_dim,
        full_kv_heads=full_kv,
        full_k_eq_v=bool(c.get("attention_k_eq_v")),
        rope_full_rotated=full_rope["rotated"],
        layer_scalar=True,
        hf_repo=name if isinstance(name := c.get("_name_or_path"), str) and name else None,  # informational
        kv_shared_layers=shared,
        double_wide_mlp=_flag(c, "use_double_wide_mlp", where),
        per_layer_input_size=ple,
        per_layer_vocab_size=number("vocab_size_per_layer_input") if ple else None,
        num_experts=number("num_experts") if moe else 0,
        experts_per_token=number("top_k_experts") if moe else 0,
        expert_intermediate_size=number("moe_intermediate_size") if moe else 0,
    )


def _count(c: dict[str, Any], key: str, number: Callable[..., Any]) -> int:
    """A size that may be 0 (or null: 0)."""
    return number(key) if c.get(key) else 0


def _flag(c: dict[str, Any], key: str, where: str) -> bool:
    value = c.get(key)
    if value is not None and not isinstance(value, bool):
        raise GemmaError(f"{where}: field {key!r} must be true or false, got {shown(value)}")
    return bool(value)


def layer_types(c: dict[str, Any], n: int, where: str) -> tuple[str, ...]:
    """Each layer's kind: the file's layer_types, else transformers' 5:1 default; the last layer is full
    (transformers forces it so)."""
    types = c.get("layer_types")
    if types is None:
        kinds = [SLIDING if (i + 1) % 6 else FULL for i in range(n)]
    else:
        if not isinstance(types, list) or len(types) != n or any(t not in _LAYER_TYPES for t in types):
            raise GemmaError(
                f"{where}: field 'layer_types' must list one of sliding_attention / full_attention per layer ({n}), "
                f"got {shown(types)}"
            )
        kinds = [_LAYER_TYPES[t] for t in types]
    if kinds:
        kinds[-1] = FULL
    return tuple(kinds)


def full_geometry(
    c: dict[str, Any], types: tuple[str, ...], number: Callable[..., Any], where: str
) -> tuple[int, int | None]:
    """(head_dim, kv heads or None: the sliding layers') of the full-attention layers."""
    per_layer = c.get("per_layer_config")
    if per_layer is None:  # the hub's shape; the kv-head override only applies with keys-equal-values
        head_dim = check_size("global_head_dim", number("global_head_dim"), MAX_WIDTH)
        kv = c.get("num_global_key_value_heads") if c.get("attention_k_eq_v") else None
        return head_dim, None if kv is None else check_size("num_global_key_value_heads", kv, MAX_HEADS)
    if not isinstance(per_layer, dict):
        raise GemmaError(f"{where}: field 'per_layer_config' must be an object, got {shown(per_layer)}")
    full = [i for i, kind in enumerate(types) if kind == FULL]
    # Keys are layer indices as strings, zero-padded to the widest one ("04", ..., "34") when transformers writes
    # a model of ten layers or more.
    by_layer = {int(k) if isinstance(k, str) and k.isdecimal() else k: v for k, v in per_layer.items()}
    entries = [by_layer.get(i) for i in full]
    if set(by_layer) - set(full) or any(not isinstance(e, dict) for e in entries):
        raise GemmaError(f"{where}: field 'per_layer_config' must hold one object per full-attention layer {full}")
    shapes = {(e.get("head_dim", c.get("head_dim")), e.get("num_key_value_heads")) for e in entries}
    if len(shapes) > 1:
        raise GemmaError(f"{where}: full-attention layers of different shapes ({sorted(map(str, shapes))})")
    if not shapes:
        return number("head_dim"), None
    head_dim, kv = shapes.pop()
    head_dim = check_size("per_layer_config head_dim", head_dim, MAX_WIDTH)
    return head_dim, None if kv is None else check_size("per_layer_config num_key_value_heads", kv, MAX_HEADS)


def rope(c: dict[str, Any], where: str) -> tuple[dict[str, float], dict[str, float]]:
    """({rope_theta, factor, rotated} of the full layers, {rope_theta} of the sliding ones) from rope_parameters:
    proportional RoPE on full layers (rotated = partial_rotary_factor), the default on sliding ones."""
    params = c.get("rope_parameters") or {}
    if not isinstance(params, dict):
        raise GemmaError(f"{where}: field 'rope_parameters' must be an object, got {shown(params)}")
    full = params.get("full_attention") or {"rope_type": "proportional", "partial_rotary_factor": 0.25}
    local = params.get("sliding_attention") or {"rope_type": "default"}
    if not isinstance(full, dict) or not isinstance(local, dict):
        raise GemmaError(f"{where}: field 'rope_parameters' must map layer types to objects")
    if local.get("rope_type", "default") != "default":
        raise GemmaError(f"{where}: RoPE {shown(local.get('rope_type'))} on sliding layers is not supported")
    kind = full.get("rope_type", "default")
    if kind not in ("default", "proportional"):
        raise GemmaError(f"{where}: RoPE {shown(kind)} on full layers is not supported (default, proportional)")
    rotated = full.get("partial_rotary_factor", 1.0) if kind == "proportional" else 1.0
    out = {"rope_theta": full.get("rope_theta", 1_000_000.0), "factor": full.get("factor", 1.0), "rotated": rotated}
    return out, {"rope_theta": local.get("rope_theta", 10_000.0)}


def to_gemma4_config(cfg: GemmaConfig, token_ids: dict[str, int]) -> dict[str, Any]:
    """An HF config.json for a Gemma 4 text decoder, in the shape transformers 5.24 writes (per_layer_config)."""
    fixed = dict(use_qk_norm=True, sandwich_norms=True, fixed_attn_scale=1.0, use_v_norm=True, layer_scalar=True)
    fixed.update(attn_softcap=None, query_pre_attn_scalar=None)
    if any(getattr(cfg, name) != value for name, value in fixed.items()):
        raise GemmaError("this architecture has no HF Gemma 4 equivalent")
    full = [i for i, kind in enumerate(cfg.layer_types) if kind == FULL]
    override = {"head_dim": cfg.head_dim_of(FULL)}
    if cfg.full_kv_heads is not None:
        override["num_key_value_heads"] = cfg.full_kv_heads
    return {
        "architectures": ["Gemma4ForCausalLM"],
        "model_type": "gemma4_text",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "per_layer_config": {str(i): dict(override) for i in full},
        "attention_k_eq_v": cfg.full_k_eq_v,
        "hidden_activation": "gelu_pytorch_tanh",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "sliding_window": cfg.sliding_window or cfg.max_seq_len,
        "final_logit_softcapping": cfg.final_softcap,
        "layer_types": ["sliding_attention" if t == SLIDING else "full_attention" for t in cfg.layer_types],
        "rope_parameters": {
            "full_attention": {
                "rope_type": "proportional",
                "partial_rotary_factor": cfg.rope_full_rotated,
                "rope_theta": cfg.rope_theta,
                **({"factor": cfg.rope_scaling} if cfg.rope_scaling != 1.0 else {}),
            },
            "sliding_attention": {"rope_type": "default", "rope_theta": cfg.rope_local_theta},
        },
        "hidden_size_per_layer_input": cfg.per_layer_input_size,
        "vocab_size_per_layer_input": cfg.per_layer_vocab_size or cfg.vocab_size,
        "num_kv_shared_layers": cfg.kv_shared_layers,
        "use_double_wide_mlp": cfg.double_wide_mlp,
        "enable_moe_block": bool(cfg.num_experts),
        "num_experts": cfg.num_experts or None,
        "top_k_experts": cfg.experts_per_token or None,
        "moe_intermediate_size": cfg.expert_intermediate_size or None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        **token_ids,
        **({"_name_or_path": cfg.hf_repo} if cfg.hf_repo else {}),
        "torch_dtype": "float32",
    }
