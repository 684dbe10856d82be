"""The gemma4 architecture of the GGUF writer (gemma/formats/gguf_write.py): its metadata, its BPE vocabulary and its
rope_freqs tensor, as llama.cpp's converter writes them (conversion/gemma.py, Gemma4Model) and as llama.cpp and our
reader (gemma/formats/gguf_gemma4.py) read them.

What the metadata says, key by key, is in gguf_gemma4.py's table. Three things of the config are not in the metadata
but in the tensors: which full layers use their keys as values (no attn_v), the full layers' partial RoPE (the
rope_freqs factors: 1 for a pair that turns, 1e30 for one that stays still) and the layer scalars.

The vocabulary is Gemma 4's tokenizer.json as llama.cpp's converter takes it through gguf's LlamaHfVocab: every
piece by id, scores -1000, types BYTE for the <0xXX> pieces, CONTROL for the added tokens marked special,
USER_DEFINED for the other added tokens and for the seven markers a chat parser must see in the text, NORMAL for the
rest; the BPE merges by rank; tokenizer model "gemma4" (llama.cpp's SPM-style BPE), no space prefix, <bos> added.
"""

from __future__ import annotations

import json

import numpy as np

from gemma.errors import GemmaError
from gemma.formats.gguf import _ROPE_FREQS, _gguf
from gemma.model.config import FULL, SLIDING, GemmaConfig

_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 3, 4, 5, 6
# The converter's visible_tokens: always rendered, so that llama.cpp's chat parser reads them in the reply.
_VISIBLE = {"<|channel>", "<channel|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>", '<|"|>'}
_STILL_FACTOR = 1e30  # a rope_freqs factor that keeps its pair still (the converter's)
# Derived by our reader from the weights' names rather than the metadata: the preflight read of the metadata (and
# rope_freqs) cannot see them, and the whole file is compared once written.
TENSOR_DERIVED = ("full_k_eq_v", "layer_scalar")


def unsupported(cfg: GemmaConfig) -> list[str]:
    """What llama.cpp's gemma4 graph does not run, of what this config does."""
    out = []
    if cfg.attn_softcap is not None:
        out.append("an attention logit softcap")
    if cfg.fixed_attn_scale != 1.0:
        out.append(f"an attention scale of {cfg.fixed_attn_scale} (llama.cpp's gemma4 uses 1)")
    if cfg.norm_offset != 0.0:
        out.append("RMSNorm weights stored as w - 1 (norm_offset)")
    if cfg.kv_shared_layers:
        # llama.cpp's KV-sharing layers reuse the last two layers with keys and values of their own: a sliding one
        # the one before last, a full one the last (llama-model.cpp, the gemma4 layer_reuse_cb). We, as
        # transformers, reuse the last earlier layer of the same kind; the two agree only in that layout.
        n = cfg.first_shared
        if n < 2 or tuple(cfg.layer_types[n - 2 : n]) != (SLIDING, FULL):
            out.append(
                "KV sharing unless the last two layers with keys and values of their own are a sliding and then a "
                "full one (llama.cpp reuses those two)"
            )
    return out


def metadata(writer, cfg: GemmaConfig) -> None:
    """The gemma4 hyperparameters (the generic ones are gguf_write._metadata's business)."""
    layers = range(cfg.num_layers)
    kinds = cfg.layer_types
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_layers)
    if cfg.double_wide_mlp:
        writer.add_feed_forward_length([cfg.intermediate_of(i) for i in layers])
    else:
        writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_heads)
    if cfg.full_kv_heads is not None:
        writer.add_head_count_kv([cfg.kv_heads_of(k) for k in kinds])
    else:
        writer.add_head_count_kv(cfg.num_kv_heads)
    full, swa = cfg.head_dim_of(FULL), cfg.head_dim_of(SLIDING)
    writer.add_key_length(full)
    writer.add_value_length(full)
    writer.add_key_length_swa(swa)
    writer.add_value_length_swa(swa)
    writer.add_rope_dimension_count(full)  # the partial turn is rope_freqs'
    writer.add_rope_dimension_count_swa(swa)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_rope_freq_base_swa(cfg.rope_local_theta)
    if cfg.rope_scaling != 1.0:
        writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(cfg.rope_scaling)
    writer.add_final_logit_softcapping(cfg.final_softcap or 0.0)  # 0 turns it off; absent, llama.cpp assumes 30
    if SLIDING in kinds:
        writer.add_sliding_window(cfg.sliding_window)
    writer.add_sliding_window_pattern([k == SLIDING for k in kinds])
    writer.add_shared_kv_layers(cfg.kv_shared_layers)
    writer.add_embedding_length_per_layer_input(cfg.per_layer_input_size or 0)
    if cfg.num_experts:
        writer.add_expert_count(cfg.num_experts)
        writer.add_expert_used_count(cfg.experts_per_token)
        writer.add_expert_feed_forward_length(cfg.expert_intermediate_size)


def rope_freqs(cfg: GemmaConfig) -> np.ndarray | None:
    """The full layers' RoPE frequency factors (None when no layer is full)."""
    if FULL not in cfg.layer_types:
        return None
    pairs = cfg.head_dim_of(FULL) // 2
    turning = int(cfg.rope_full_rotated * cfg.head_dim_of(FULL) // 2)  # as gemma.model.layers counts them
    return np.array([1.0] * turning + [_STILL_FACTOR] * (pairs - turning), dtype=np.float32)


ROPE_FREQS = _ROPE_FREQS


def vocabulary(tokenizer, vocab_size: int):
    """Gemma 4's tokenizer.json as llama.cpp's converter writes it (see the module docstring). Built once; returns
    (what adds its pieces and merges to a writer, the unknown piece's id), as gguf_write._vocabulary does."""
    raw = tokenizer.files.get("tokenizer.json")
    if raw is None:
        raise GemmaError("writing a Gemma 4 GGUF vocabulary needs its tokenizer.json")
    data = json.loads(raw)
    model = data.get("model", {})
    if model.get("type") != "BPE" or not model.get("byte_fallback"):
        raise GemmaError("writing a Gemma 4 GGUF vocabulary needs a BPE tokenizer.json with byte fallback")
    by_id: dict[int, str] = {i: piece for piece, i in model["vocab"].items()}
    kinds: dict[int, int] = {}
    for added in data.get("added_tokens", []):
        by_id[added["id"]] = added["content"]
        kinds[added["id"]] = _CONTROL if added.get("special") else _USER_DEFINED
    n = max(by_id) + 1
    if n > vocab_size:
        raise GemmaError(f"the tokenizer has {n} pieces but the model's embedding only {vocab_size} rows")
    tokens, types = [], []
    for i in range(vocab_size):
        text = by_id.get(i)
        if text is None:  # an embedding row no piece names, padded as llama.cpp's converter pads them
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        kind = kinds.get(i, _NORMAL)
        if kind == _NORMAL and len(text) == 6 and text.startswith("<0x") and text.endswith(">"):
            kind = _BYTE
        if text in _VISIBLE:
            kind = _USER_DEFINED
        tokens.append(text)
        types.append(kind)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    unk = model.get("unk_token")
    unk_id = model["vocab"].get(unk) if unk is not None else None

    def add(writer) -> None:
        writer.add_tokenizer_model("gemma4")
        writer.add_tokenizer_pre("gemma4")
        writer.add_token_list(tokens)
        writer.add_token_scores([-1000.0] * len(tokens))
        writer.add_token_types(types)
        writer.add_token_merges(merges)

    return add, unk_id
