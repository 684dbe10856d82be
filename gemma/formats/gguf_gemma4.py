"""The gemma4 architecture of GGUF files (llama.cpp's Gemma 4): its config from the metadata and the tensors, and the
check of its rope_freqs tensor. gemma.formats.gguf reads the rest (the file, its weights by the shared name table)
and calls in here for this architecture.
"""

from __future__ import annotations

import numpy as np

from gemma.errors import GemmaError
from gemma.formats.gguf import _GEMMA3_LOCAL_THETA, _ROPE_FREQS, _Meta, _gguf, _gguf_rope, _gguf_vocab_size, _shape
from gemma.model.config import FULL, MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, SLIDING, GemmaConfig, check_size, shown

# llama.cpp's f_final_logit_softcapping when a gemma4 file has no key for it (llama_hparams' default); 0 turns it off.
_GEMMA4_FINAL_SOFTCAP = 30.0

# What llama.cpp reads for gemma4 (src/models/gemma4.cpp, load_arch_hparams, over the generic keys of llama-model.cpp)
# and where the converter (conversion/gemma.py, Gemma4Model.set_gguf_parameters over TextModel's) writes it from:
#   key_length / key_length_swa       full layers' head_dim (global_head_dim) / sliding layers' (head_dim)
#   head_count_kv                     one count, or one per layer (sliding: num_key_value_heads, full:
#                                     num_global_key_value_heads) when the config has a global count
#   feed_forward_length               one width, or one per layer (twice on the KV-sharing layers) with
#                                     use_double_wide_mlp
#   sliding_window_pattern            one bool per layer, true = sliding
#   shared_kv_layers, embedding_length_per_layer_input, expert_count / expert_used_count / expert_feed_forward_length
#   rope.freq_base / freq_base_swa    full / sliding rope_theta; rope.dimension_count(_swa) the whole head widths
# Neither writes which layers have keys equal values, nor partial_rotary_factor: llama.cpp reads the first from the
# tensors (a full layer without attn_v uses its keys as values) and applies the second through rope_freqs.

# A frequency factor at least this large keeps its pair still: no position (below 2**24, MAX_POSITIONS) turns it by
# more than float32's resolution (2**-24 rad). The converter writes 1e30.
_STILL = float(MAX_POSITIONS) * 2.0**24


def _turning_pairs(t, pairs: int, where: str) -> int:
    """How many rotation pairs of a full-attention head turn, from the rope_freqs tensor `t` (`pairs` of them): its
    factors must be 1 for the first few (they turn as plain RoPE does) and still for the rest (see _STILL), which is
    proportional RoPE; other factors would rescale frequencies, which our RoPE does not do."""
    if t is None:
        raise GemmaError(f"{where}: missing tensor {_ROPE_FREQS!r} (the full-attention layers' RoPE frequency factors)")
    if _shape(t) != (pairs,):
        raise GemmaError(f"{where}: tensor {_ROPE_FREQS!r} has shape {_shape(t)}, the config needs {(pairs,)}")
    try:
        factors = np.asarray(_gguf().quants.dequantize(t.data, t.tensor_type), np.float32).reshape(-1)
    except (NotImplementedError, ValueError) as exc:
        raise GemmaError(f"{where}: cannot read tensor {_ROPE_FREQS!r} ({exc})") from None
    turning = int(np.argmax(factors != 1)) if (factors != 1).any() else pairs
    if turning == 0 or not (factors[turning:] >= _STILL).all():
        raise GemmaError(
            f"{where}: tensor {_ROPE_FREQS!r} holds RoPE frequency factors {shown(factors.tolist())}, not proportional "
            "RoPE's 1 for each pair that turns and ~1e30 for the rest; not supported"
        )
    return turning


def gemma4_config(reader, meta: _Meta, where: str, vocab_size: int | None) -> GemmaConfig:
    def key(name: str) -> str:
        return f"gemma4.{name}"

    hidden = meta.integer(key("embedding_length"))
    n_layers = check_size("num_layers", meta.integer(key("block_count")), MAX_LAYERS)
    heads = check_size("num_heads", meta.integer(key("attention.head_count")), MAX_HEADS)
    pattern = meta.get(key("attention.sliding_window_pattern"))
    if isinstance(pattern, bool):  # get_key_or_arr: one value for every layer
        pattern = [pattern] * n_layers
    if not isinstance(pattern, list) or len(pattern) != n_layers or not all(isinstance(p, bool) for p in pattern):
        raise GemmaError(
            f"{where}: metadata {key('attention.sliding_window_pattern')!r} should hold one bool per layer "
            f"({n_layers}; true = sliding), got {shown(pattern)}"
        )
    kinds = [SLIDING if p else FULL for p in pattern]
    shared = meta.integer(key("attention.shared_kv_layers"), 0)
    first_shared = n_layers - shared
    sharing = ["KV-sharing" if i >= first_shared else "other" for i in range(n_layers)]

    # Head widths per kind; llama.cpp refuses values narrower or wider than keys, and so do we.
    head_dim = meta.integer(key("attention.key_length_swa"))
    full_head_dim = meta.integer(key("attention.key_length"), hidden // heads)  # llama.cpp's default too
    for name, width in (("value_length_swa", head_dim), ("value_length", full_head_dim)):
        value = meta.integer(key(f"attention.{name}"), width)
        if value != width:
            raise GemmaError(
                f"{where}: metadata {key('attention.' + name)!r} ({value}) differs from "
                f"{name.replace('value', 'key')} ({width}); not supported"
            )
    # RoPE turns whole heads (pairs i, i + d/2); the full layers' partial turn is rope_freqs' business.
    full_rope = meta.integer(key("rope.dimension_count"), full_head_dim)
    swa_rope = meta.integer(key("rope.dimension_count_swa"), full_rope)  # llama.cpp's default: the full layers'
    for name, dims, width in (
        ("dimension_count", full_rope, full_head_dim),
        ("dimension_count_swa", swa_rope, head_dim),
    ):
        if dims != width:
            raise GemmaError(f"{where}: RoPE on {dims} of {width} head dimensions (rope.{name}) is not supported")

    kv = meta.per_layer(key("attention.head_count_kv"), kinds, heads)  # llama.cpp's default: head_count
    ffn = meta.per_layer(key("feed_forward_length"), sharing)
    intermediate = ffn.get("other", ffn.get("KV-sharing"))
    wide = ffn.get("KV-sharing", intermediate)
    if wide not in (intermediate, 2 * intermediate):
        raise GemmaError(
            f"{where}: metadata {key('feed_forward_length')!r} gives the KV-sharing layers {wide}, neither the "
            f"others' {intermediate} nor twice it; not supported"
        )

    names = {t.name for t in reader.tensors}
    # Keys equal values where a full layer with keys of its own has no attn_v (llama.cpp: wv is optional there).
    own_full = [i for i in range(min(first_shared, n_layers)) if kinds[i] == FULL]
    has_v = {f"blk.{i}.attn_v.weight" in names for i in own_full}
    if len(has_v) > 1:
        raise GemmaError(f"{where}: some full-attention layers have attn_v and some do not; not supported")
    rotated = 1.0
    if FULL in kinds:  # llama.cpp needs rope_freqs only for full layers
        freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
        turning = _turning_pairs(freqs, full_head_dim // 2, where)
        rotated = 2 * turning / full_head_dim
        if int(rotated * full_head_dim // 2) != turning:  # the share our RoPE turns back into pairs
            raise GemmaError(f"{where}: RoPE turning {turning} of {full_head_dim // 2} pairs is not supported")

    if vocab_size is None:
        vocab_size = _gguf_vocab_size(reader, where)
    # llama.cpp's gemma4 scales positions on the full layers only (rope_freq_scale_train_swa stays 1), as we do.
    _, _, factor = _gguf_rope(meta, key, "gemma4", where)
    per_layer = meta.integer(key("embedding_length_per_layer_input"))
    experts = meta.integer(key("expert_count"), 0)
    softcap = meta.decimal(key("final_logit_softcapping"), _GEMMA4_FINAL_SOFTCAP)
    return GemmaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_layers=n_layers,
        num_heads=heads,
        num_kv_heads=kv.get(SLIDING, kv.get(FULL)),
        head_dim=head_dim,
        norm_eps=meta.decimal(key("attention.layer_norm_rms_epsilon")),
        rope_theta=meta.decimal(key("rope.freq_base"), 10_000.0),
        rope_local_theta=meta.decimal(key("rope.freq_base_swa"), _GEMMA3_LOCAL_THETA),
        rope_scaling=factor,
        final_softcap=softcap or None,
        use_qk_norm=True,
        sandwich_norms=True,
        sliding_window=meta.integer(key("attention.sliding_window")) if SLIDING in kinds else None,
        layer_types=tuple(kinds),
        max_seq_len=meta.integer(key("context_length")),
        norm_offset=0.0,
        fixed_attn_scale=1.0,  # llama.cpp: f_attention_scale = 1, as Gemma 4's scaling
        use_v_norm=True,
        full_head_dim=full_head_dim,
        full_kv_heads=kv.get(FULL),
        full_k_eq_v=has_v == {False},
        rope_full_rotated=rotated,
        layer_scalar=any(f"blk.{i}.layer_output_scale.weight" in names for i in range(n_layers)),
        kv_shared_layers=shared,
        double_wide_mlp=wide != intermediate,
        per_layer_input_size=per_layer,
        per_layer_vocab_size=vocab_size if per_layer else None,  # llama.cpp: per_layer_token_embd has n_vocab rows
        num_experts=experts,
        experts_per_token=meta.integer(key("expert_used_count")) if experts else 0,
        expert_intermediate_size=meta.integer(key("expert_feed_forward_length")) if experts else 0,
    )


def check_rope_freqs(reader, cfg: GemmaConfig, where: str) -> None:
    """The file's rope_freqs turns as many pairs of a full-attention head as cfg's RoPE does (what llama.cpp runs is
    what the model runs)."""
    freqs = next((t for t in reader.tensors if t.name == _ROPE_FREQS), None)
    head_dim = cfg.head_dim_of(FULL)
    turning = _turning_pairs(freqs, head_dim // 2, where)
    wanted = int(cfg.rope_full_rotated * head_dim // 2)  # as gemma.model.layers.rope_inv_freq counts them
    if turning != wanted:
        raise GemmaError(
            f"{where}: tensor {_ROPE_FREQS!r} turns {turning} of {head_dim // 2} RoPE pairs, but the config's "
            f"rope_full_rotated ({cfg.rope_full_rotated}) turns {wanted}"
        )


# GGUF token types (llama.cpp's llama_token_type) that are added tokens of a tokenizer.json.
_CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 3, 4, 5, 6
# The markers llama.cpp's converter stores USER_DEFINED so that its chat parser sees them; they are special tokens
# of Gemma 4's tokenizer.json (message content must not produce them), and are read back as such.
_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}


def gguf_tokenizer_json(meta: _Meta, where: str) -> tuple[bytes, dict[str, str]]:
    """(a tokenizer.json, its bos/eos/pad pieces) rebuilt from a gemma4 file's vocabulary: Gemma 4's BPE over
    U+2581-spaces with byte fallback, its merges by rank, CONTROL tokens (and the markers stored USER_DEFINED) as
    special added tokens, other USER_DEFINED ones as plain added tokens; the [PADn] rows are left out."""
    import json

    tokens = meta.get("tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", None) or [1] * len(tokens)
    merges = meta.get("tokenizer.ggml.merges", None)
    if merges is None:
        raise GemmaError(f"{where}: a gemma4 vocabulary without tokenizer.ggml.merges")
    if len(types) != len(tokens):
        raise GemmaError(f"{where}: {len(tokens)} tokens but {len(types)} token types")
    while tokens and types[-1] == _UNUSED and tokens[-1].startswith("[PAD"):
        tokens, types = tokens[:-1], types[:-1]
    vocab, added = {}, []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if text in vocab:
            raise GemmaError(f"{where}: tokens {vocab[text]} and {i} are both {text!r}")
        vocab[text] = i
        if kind in (_CONTROL, _USER_DEFINED):
            special = kind == _CONTROL or text in _VISIBLE
            added.append(
                {
                    "id": i,
                    "content": text,
                    "single_word": False,
                    "lstrip": False,
                    "rstrip": False,
                    "normalized": False,
                    "special": special,
                }
            )
    pairs = []
    for rank, merge in enumerate(merges):
        cut = merge.find(" ", 1)  # as llama.cpp splits them
        if cut < 0:
            raise GemmaError(f"{where}: merge {rank} ({merge!r}) is not two pieces")
        pairs.append([merge[:cut], merge[cut + 1 :]])

    def piece(key: str) -> str | None:
        i = meta.integer(f"tokenizer.ggml.{key}") if f"tokenizer.ggml.{key}" in meta.fields else -1
        return tokens[i] if 0 <= i < len(tokens) else None

    data = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": {
            "type": "Split",
            "pattern": {"String": " "},
            "behavior": "MergedWithPrevious",
            "invert": False,
        },
        "post_processor": None,
        "decoder": {
            "type": "Sequence",
            "decoders": [
                {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
                {"type": "ByteFallback"},
                {"type": "Fuse"},
            ],
        },
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": piece("unknown_token_id"),
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": True,
            "byte_fallback": sum(t == _BYTE for t in types) == 256,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": pairs,
        },
    }
    roles = {
        name: p
        for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("pad", "padding_token_id"))
        if (p := piece(key)) is not None
    }
    return json.dumps(data, ensure_ascii=False).encode("utf-8"), roles
