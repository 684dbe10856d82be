"""Tiny random Gemma models of each generation, built by transformers and saved as HF folders.

Each case covers a feature the parity tests must exercise: MQA, MHA with hidden != heads x head_dim (like gemma
7b), GQA, a sliding window shorter than the test sequence, both softcaps (small enough that tanh bends), q/k norm,
linear RoPE scaling, and random (not zero) norm weights.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 1024  # at least the tiny tokenizer's vocabulary


def hf_config(case: str):
    import transformers as tf

    common = dict(
        vocab_size=VOCAB,
        intermediate_size=96,
        rms_norm_eps=1e-6,
        max_position_embeddings=256,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=2,
    )
    if case == "gemma1-mqa":  # like gemma 2b: one kv head
        return tf.GemmaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16, **common
        )
    if case == "gemma1-mha":  # like gemma 7b: hidden (48) != heads x head_dim (64)
        return tf.GemmaConfig(
            hidden_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, head_dim=16, **common
        )
    if case == "gemma2":  # GQA, local/global alternation, both softcaps small enough to bend
        return tf.Gemma2Config(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=5,
            attn_logit_softcapping=3.0,
            final_logit_softcapping=2.5,
            **common,
        )
    if case == "gemma3":  # q/k norm, per-layer RoPE bases, linear scaling on global layers, 2:1 pattern
        return tf.Gemma3TextConfig(
            hidden_size=64,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            query_pre_attn_scalar=20,
            sliding_window=5,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
            rope_parameters={
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1_000_000.0},
                "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
            },
            **common,
        )
    if case == "gemma4":  # every Gemma 4 branch at once (the parity configs are in test_gemma4.py)
        return tf.Gemma4TextConfig(
            hidden_size=64,
            num_hidden_layers=6,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_global_key_value_heads=1,
            attention_k_eq_v=True,
            head_dim=16,
            global_head_dim=32,
            sliding_window=5,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"] * 2,  # the last forced full
            final_logit_softcapping=30.0,
            vocab_size_per_layer_input=VOCAB,
            hidden_size_per_layer_input=8,
            num_kv_shared_layers=2,
            use_double_wide_mlp=True,
            enable_moe_block=True,
            num_experts=4,
            top_k_experts=2,
            moe_intermediate_size=16,
            **common,
        )
    raise ValueError(case)


CASES = ("gemma1-mqa", "gemma1-mha", "gemma2", "gemma3", "gemma4")


def hf_model(case: str, seed: int = 0, attn: str = "eager", **overrides):
    """A transformers model with random weights large enough that every feature matters (`overrides`: config
    fields set differently)."""
    import transformers as tf

    cfg = hf_config(case)
    for key, value in overrides.items():
        setattr(cfg, key, value)
    cfg._attn_implementation = attn
    cfg._experts_implementation = "eager"
    cls = {
        "gemma1-mqa": tf.GemmaForCausalLM,
        "gemma1-mha": tf.GemmaForCausalLM,
        "gemma2": tf.Gemma2ForCausalLM,
        "gemma3": tf.Gemma3ForCausalLM,
        "gemma4": tf.Gemma4ForCausalLM,
    }[case]
    torch.manual_seed(seed)
    model = cls(cfg).eval()
    # Gemma 1-3 keep zero-centred norm weights (x (1 + w)); Gemma 4's multiply directly, as do its router scales.
    centre = 1.0 if case == "gemma4" else 0.0
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")) or "layernorm" in name:
                p.copy_(centre + torch.randn_like(p) * 0.5)  # not their constant initial value
            else:
                p.copy_(torch.randn_like(p) * (0.5 if "embed" in name and case != "gemma4" else 0.15))
            if case == "gemma4" and name.endswith(("q_norm.weight", "k_norm.weight")):
                # Gemma 4 scales q @ k^T by 1: with q/k norm weights near 1, these 16-wide heads would see logits
                # up to ~36, a softmax so sharp that float32 rounding in the keys moves the outputs by 1e-4.
                p.copy_(0.5 + torch.randn_like(p) * 0.1)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model


def save_hf_model(case: str, folder: Path, seed: int = 0) -> Path:
    model = hf_model(case, seed)
    model.save_pretrained(folder)
    return folder


def tokens(batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(3, VOCAB, (batch, length), generator=g)
    t[:, 0] = 2  # BOS
    return t


def bf16_errors(make_hf, folder: Path, make_tokens, seeds: int = 3) -> tuple[float, float]:
    """(our bf16 logits' error, transformers' bf16 logits' error), each the mean |difference| from transformers'
    fp32 logits, summed over `seeds` random models (`make_hf(seed)`) and inputs (`make_tokens(seed)`): pooled,
    since one small model's bf16 rounding is a noisy sample. Ours loads in bf16 from the folder transformers wrote."""
    from gemma.formats.checkpoint import build_model, load_hf_folder

    ours_err = theirs_err = 0.0
    for seed in range(seeds):
        hf = make_hf(seed)
        hf.save_pretrained(folder / str(seed))
        ours = build_model(*load_hf_folder(folder / str(seed), torch.bfloat16))
        x = make_tokens(seed)
        with torch.no_grad():
            ref = hf(x).logits.float()
            theirs_err += float((hf.to(torch.bfloat16)(x).logits.float() - ref).abs().mean())
            ours_err += float((ours(x) - ref).abs().mean())
    return ours_err, theirs_err
