"""Gemma 4's text decoder against transformers' Gemma4ForCausalLM, on tiny random configs with everything that
transformers initialises to a constant randomised (norm weights, layer scalars, the router's scales): fp32 logits
within 1e-5, and the KV cache (prefill, then one token at a time past the sliding window) equal to the full forward.

Which quirk each config exercises (removing any one fails a test):
- all: RMSNorm by w (not 1 + w), attention scale 1, q/k norms and the weightless v norm, the final softcap,
  layer_scalar, per-kind head_dim (sliding 12, full 24), proportional RoPE on full layers (3 of 12 frequencies turn).
- "k=v": keys-equal-values on full layers (no v projection) with their own kv-head count (1 against 2).
- "plain": full layers with a v projection and the sliding layers' kv-head count.
- "E" (E2B-like, the notes' config A): per-layer embeddings (P = 8), 4 KV-sharing layers reading the K/V of the
  last earlier sliding (layer 4) and full (layer 2) layer, one kv head, window 5, the double-wide MLP (64 -> 128) on
  the sharing layers.
- "moe" (26B-A4B-like, config C): the mixture-of-experts block (8 experts, top 3) beside the dense MLP, k=v.
- "all" (config D): PLE, KV sharing (3 layers), double-wide MLP, MoE (6 experts, top 2) and k=v together, window 4.
"""

from __future__ import annotations

import pytest
import torch
import transformers as tf

from gemma.formats.checkpoint import build_model, hf_names
from gemma.model.config import FULL, SLIDING, GemmaConfig

S, F = "sliding_attention", "full_attention"
_KV = dict(num_key_value_heads=2, num_global_key_value_heads=1, attention_k_eq_v=True)
CASES = {
    "k=v": dict(layer_types=[S, S, F, S, S, F], sliding_window=6, **_KV),
    "plain": dict(layer_types=[S, S, F, S, S, F], sliding_window=6, num_key_value_heads=2, attention_k_eq_v=False),
    "E": dict(
        layer_types=[S, S, F, S, S, S, F],
        sliding_window=5,
        num_key_value_heads=1,
        intermediate_size=64,
        use_double_wide_mlp=True,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=4,
    ),
    "moe": dict(
        layer_types=[S, F, S, F],
        sliding_window=6,
        intermediate_size=40,
        enable_moe_block=True,
        num_experts=8,
        top_k_experts=3,
        moe_intermediate_size=16,
        **_KV,
    ),
    "all": dict(
        layer_types=[S, F, S, S, F, F],
        sliding_window=4,
        intermediate_size=40,
        use_double_wide_mlp=True,
        enable_moe_block=True,
        num_experts=6,
        top_k_experts=2,
        moe_intermediate_size=12,
        hidden_size_per_layer_input=8,
        num_kv_shared_layers=3,
        **_KV,
    ),
}


def hf_gemma4(case: str, seed: int = 0, vocab: int = 96):
    torch.manual_seed(seed)
    fields = {"intermediate_size": 96, "hidden_size_per_layer_input": 0, "num_kv_shared_layers": 0, **CASES[case]}
    cfg = tf.Gemma4TextConfig(
        vocab_size=vocab,
        vocab_size_per_layer_input=vocab,
        hidden_size=48,
        num_hidden_layers=len(fields["layer_types"]),
        num_attention_heads=4,
        head_dim=12,
        global_head_dim=24,
        final_logit_softcapping=30.0,
        max_position_embeddings=256,
        **fields,
    )
    cfg._attn_implementation = "eager"
    cfg._experts_implementation = "eager"
    model = tf.Gemma4ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm.weight", "router.scale", "per_expert_scale")):
                p.copy_(1 + 0.5 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.15)
        for name, b in model.named_buffers():
            if name.endswith("layer_scalar"):
                b.uniform_(0.5, 1.5)
    return model


def our_config(hf) -> GemmaConfig:
    c = hf.config
    local, full = c.per_layer_config[c.layer_types.index(S)], c.per_layer_config[c.layer_types.index(F)]
    return GemmaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_layers=c.num_hidden_layers,
        num_heads=c.num_attention_heads,
        num_kv_heads=local.num_key_value_heads,
        head_dim=local.head_dim,
        norm_eps=c.rms_norm_eps,
        rope_theta=c.rope_parameters[F]["rope_theta"],
        rope_local_theta=c.rope_parameters[S]["rope_theta"],
        final_softcap=c.final_logit_softcapping,
        use_qk_norm=True,
        sandwich_norms=True,
        sliding_window=c.sliding_window,
        layer_types=tuple(SLIDING if t == S else FULL for t in c.layer_types),
        max_seq_len=c.max_position_embeddings,
        norm_offset=0.0,
        fixed_attn_scale=1.0,
        use_v_norm=True,
        full_head_dim=full.head_dim,
        full_kv_heads=full.num_key_value_heads,
        full_k_eq_v=c.attention_k_eq_v,
        rope_full_rotated=c.rope_parameters[F]["partial_rotary_factor"],
        layer_scalar=True,
        kv_shared_layers=c.num_kv_shared_layers,
        double_wide_mlp=c.use_double_wide_mlp,
        per_layer_input_size=c.hidden_size_per_layer_input,
        per_layer_vocab_size=c.vocab_size_per_layer_input if c.hidden_size_per_layer_input else None,
        num_experts=c.num_experts or 0 if c.enable_moe_block else 0,
        experts_per_token=c.top_k_experts or 0 if c.enable_moe_block else 0,
        expert_intermediate_size=c.moe_intermediate_size or 0 if c.enable_moe_block else 0,
    )


def ours_from(hf):
    cfg = our_config(hf)
    theirs = hf.state_dict()
    state = {native: theirs[name].clone() for native, name in hf_names(cfg).items()}
    unused = set(theirs) - set(hf_names(cfg).values()) - {"lm_head.weight"}  # the tied head
    assert not unused, unused  # every tensor of theirs is one of ours
    return build_model(cfg, state)


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request):
    hf = hf_gemma4(request.param)
    return hf, ours_from(hf)


def tokens(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 96, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_fp32_logits_match_transformers(pair):
    hf, ours = pair
    ids = tokens(2, 13)  # longer than the window (6)
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    # Our attention runs in SDPA, theirs op by op: each attention output differs by about 1 float32 ulp (4.8e-7 on
    # layer 0), which the "all" config (six layers of attention, MoE and PLE at once) carries to 1.1e-5 on the
    # logits (the router and experts give the same bits as theirs): 1.5e-5 for the MoE configs, 1e-5 for the rest.
    torch.testing.assert_close(got, expected, rtol=0, atol=1.5e-5 if hf.config.enable_moe_block else 1e-5)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bf16_no_worse_than_transformers_bf16(case, tmp_path):
    from tiny_models import bf16_errors

    moe = "num_experts" in CASES[case]
    # With experts, a bf16 rounding that flips one token's top-k choice moves its logits far, in either model: the
    # pooled error is noisy unless pooled over many models (3 seeds give ratios of 0.85-1.19 on "all" and "moe",
    # 30 give 0.95 and 1.04; the router and experts give the same bits as transformers' on equal inputs).
    seeds = 30 if moe else 3
    our_err, hf_err = bf16_errors(
        lambda seed: hf_gemma4(case, seed), tmp_path, lambda seed: tokens(4, 16, seed), seeds=seeds
    )
    # Both round the same ops to bf16; 5% slack absorbs the different summation orders of SDPA vs eager (10% for
    # the routing noise left after 30 models).
    assert our_err <= hf_err * (1.10 if moe else 1.05), (our_err, hf_err)


def test_cached_decoding_equals_the_full_forward(pair):
    _, ours = pair
    ids = tokens(2, 13)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 13)
        steps = [ours(ids[:, :6], cache=cache)]
        for t in range(6, 13):
            steps.append(ours(ids[:, t : t + 1], cache=cache))
    # 2e-5, not 1e-5: one token at a time sums attention in another order than the full pass, and on the k=v case
    # transformers' own cache differs from its full forward by 1.3e-5 (ours by 1.4e-5; 7e-6 from transformers').
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=0, atol=2e-5)


def test_each_layer_has_the_projections_its_kind_and_sharing_give(pair):
    _, ours = pair
    cfg = ours.config
    cache = ours.new_cache(1, 8)
    for i, block in enumerate(ours.layers):
        reuses = i >= cfg.first_shared
        assert (block.attn.k is None) == reuses and (block.attn.k_norm is None) == reuses
        assert (block.attn.v is None) == (reuses or cfg.full_k_eq_v and cfg.layer_types[i] == FULL)
        assert block.attn.head_dim == (24 if cfg.layer_types[i] == FULL else 12)
        assert (cache.k[i].numel() == 0) == reuses  # a KV-sharing layer writes no cache
        assert block.mlp.gate.out_features == cfg.intermediate_size * (2 if reuses and cfg.double_wide_mlp else 1)


@pytest.mark.parametrize("cached", [False, True])
def test_last_only_equals_the_last_column(pair, cached):
    """Generation's prefill computes the last column only from the first KV-sharing layer on (and in the last
    layer); its logits are the full pass's last row."""
    _, ours = pair
    ids = tokens(2, 13)
    with torch.no_grad():
        full = ours(ids)
        cache = ours.new_cache(2, 13) if cached else None
        last = ours.logits(ours.hidden_states(ids, cache=cache, last_only=True))
    assert last.shape == (2, 1, 96)
    torch.testing.assert_close(last, full[:, -1:], rtol=0, atol=1e-5)


# ---- loading ------------------------------------------------------------------------------------------------------


def _hub_shape(config: dict) -> dict:
    """config.json as the hub ships Gemma 4 (global_head_dim / num_global_key_value_heads, no per_layer_config)."""
    out = {k: v for k, v in config.items() if k != "per_layer_config"}
    full = next(iter(config["per_layer_config"].values()))
    out["global_head_dim"] = full["head_dim"]
    if config["attention_k_eq_v"]:
        out["num_global_key_value_heads"] = full["num_key_value_heads"]
    return out


@pytest.mark.parametrize("shape", ["5.24", "hub", "multimodal"])
def test_an_hf_folder_loads_in_each_config_shape(pair, tmp_path, shape):
    """transformers' own folder (per_layer_config), the hub's config shape, and the multimodal layout (text under
    model.language_model., a vision tower skipped by name) all give the same model."""
    import json

    from safetensors.torch import load_file, save_file

    from gemma.formats.checkpoint import load_hf_folder

    hf, ours = pair
    hf.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    if shape == "hub":
        config = _hub_shape(config)
    elif shape == "multimodal":
        config = {"model_type": "gemma4", "text_config": _hub_shape(config)}
        weights = load_file(tmp_path / "model.safetensors")
        weights = {k.replace("model.", "model.language_model.", 1): v for k, v in weights.items()}
        weights["model.vision_tower.patch.weight"] = torch.zeros(2, 2)
        weights["model.audio_tower.conv.weight"] = torch.zeros(2, 2)
        for i in range(ours.config.first_shared, ours.config.num_layers):  # released E2B files carry these
            for name in ("k_proj", "v_proj"):
                weights[f"model.language_model.layers.{i}.self_attn.{name}.weight"] = torch.zeros(12, 48)
        save_file(weights, tmp_path / "model.safetensors")
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg, state = load_hf_folder(tmp_path)
    assert cfg == ours.config
    loaded = build_model(cfg, state)
    ids = tokens(1, 9)
    with torch.no_grad():
        assert torch.equal(loaded(ids), ours(ids))


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"use_bidirectional_attention": "all"}, "use_bidirectional_attention"),
        ({"num_kv_shared_layers": 2}, "num_kv_shared_layers .2. leaves no layer"),  # a drafter: all layers share
        ({"num_hidden_layers": 3, "layer_types": [S, F, F], "num_kv_shared_layers": 2}, "'num_kv_shared_layers'"),
        ({"enable_moe_block": True, "top_k_experts": 2, "moe_intermediate_size": 4}, "'num_experts'"),
        ({"enable_moe_block": True, "num_experts": 2, "top_k_experts": 3, "moe_intermediate_size": 4}, "top_k"),
        ({"use_double_wide_mlp": "yes"}, "'use_double_wide_mlp' must be true or false"),
        ({"hidden_size_per_layer_input": -8}, "'hidden_size_per_layer_input'"),
    ],
)
def test_a_config_our_model_cannot_be_is_refused_by_name(fields, named):
    from gemma.errors import GemmaError
    from gemma.formats.hf_config import from_hf_config

    config = {"model_type": "gemma4_text", "num_hidden_layers": 2, "layer_types": [S, F], **fields}
    with pytest.raises(GemmaError, match=named) as info:
        from_hf_config(config)
    assert "\n" not in str(info.value)


def test_the_gemma4_unified_config_reads_as_the_same_decoder():
    """The 12B's config (gemma4_unified, text_config gemma4_unified_text): no per-layer embeddings by default (a
    gemma4_text config without the key has 256-wide ones), its own window and context defaults."""
    from gemma.formats.hf_config import from_hf_config

    text = {"num_hidden_layers": 6, "layer_types": [S] * 5 + [F], "attention_k_eq_v": True, "global_head_dim": 24}
    text.update(num_global_key_value_heads=1, head_dim=12, hidden_size=48, num_attention_heads=4)
    unified = from_hf_config({"model_type": "gemma4_unified", "text_config": dict(text)})
    assert (unified.per_layer_input_size, unified.sliding_window, unified.max_seq_len) == (0, 1024, 262144)
    assert unified.full_k_eq_v and unified.full_kv_heads == 1 and unified.head_dim_of(FULL) == 24
    plain = from_hf_config({"model_type": "gemma4_text", **text})
    assert (plain.per_layer_input_size, plain.sliding_window, plain.max_seq_len) == (256, 512, 131072)


def test_our_hf_output_loads_in_transformers(pair, tmp_path, tok):
    """save_hf writes what transformers' AutoModelForCausalLM loads into the same model, and it reads back as ours."""
    from gemma.formats.checkpoint import load_hf_folder, save_hf

    hf, ours = pair
    ids = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    save_hf(tmp_path / "out", ours.config, ours.state_dict(), tok.model_proto, ids)
    theirs = tf.AutoModelForCausalLM.from_pretrained(
        tmp_path / "out", attn_implementation="eager", experts_implementation="eager"
    ).eval()
    assert type(theirs).__name__ == "Gemma4ForCausalLM"
    x = tokens(2, 13)
    with torch.no_grad():
        assert torch.equal(theirs(x).logits, hf(x).logits)
    cfg, _ = load_hf_folder(tmp_path / "out")
    assert cfg == ours.config


# ---- LoRA ---------------------------------------------------------------------------------------------------------


def projection_count(cfg: GemmaConfig) -> int:
    """The projections a model has: 7 per layer, less v on keys-equal-values layers and k, v on KV-sharing ones."""
    reuse = cfg.kv_shared_layers
    k_eq_v = sum(cfg.full_k_eq_v and kind == FULL for kind in cfg.layer_types[: cfg.first_shared])
    return 7 * cfg.num_layers - 2 * reuse - k_eq_v


@pytest.mark.parametrize("case", sorted(CASES))
def test_lora_matches_peft_in_logits_and_gradients(case, tmp_path):
    """LoRA on all seven projections where they exist (k=v layers have no v), written in the PEFT format: peft
    loads it onto transformers' model with the same logits, and the adapter's gradients agree."""
    import peft
    import torch.nn.functional as F

    import lora
    from lora.io import peft_names

    ours = ours_from(hf_gemma4(case))
    lora.inject(ours, lora.LoraConfig(r=4, alpha=8))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora" in name:
                p.normal_(0.0, 0.1)
    lora.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(hf_gemma4(case), tmp_path / "adapter", is_trainable=True).eval()
    x = tokens(2, 13)
    targets = torch.roll(x, -1, dims=1)
    for model, logits in ((ours, lambda: ours(x)), (theirs, lambda: theirs(x).logits)):
        model.zero_grad()
        F.cross_entropy(logits().flatten(0, 1), targets.flatten()).backward()
    # The per-layer-embedding configs ("E", "all") carry float32 rounding furthest: there peft's own merged and
    # unmerged logits differ by 4.1e-5 and 3.0e-5 (ours from peft's: 2.6e-5, 1.7e-5). 1e-5 for the others.
    atol = 3e-5 if "hidden_size_per_layer_input" in CASES[case] else 1e-5
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits, rtol=0, atol=atol)
    live = dict(theirs.named_parameters())
    names = peft_names(ours.config, ours.lora_config)
    assert len(names) == 2 * projection_count(ours.config)  # A and B of each projection that exists
    for name, p in ours.named_parameters():
        if name in names:
            peft_name = names[name].removesuffix(".weight") + ".default.weight"  # the live parameter's name
            g, h = p.grad, live[peft_name].grad
            # Relative to the gradient's scale (about 1 here, from weights of std 0.15 through six layers): float32
            # summation order leaves at most 1.6e-5; 3e-5 of the largest entry is the bound (9e-5 on the PLE
            # configs, 3x as sensitive as the logits above show: 3.4e-5 measured).
            assert g.abs().max() > 0, name
            torch.testing.assert_close(g, h, rtol=0, atol=(atol * 3) * h.abs().max().item())


@pytest.mark.parametrize("case", ["E", "moe", "all"])
def test_a_peft_adapter_loads_with_peft_logits(case, tmp_path):
    """The other way: an adapter peft made on transformers' model (its seven projection names, no v on k=v layers,
    no k/v on KV-sharing ones) loads onto ours, unmerged and merged, with peft's logits."""
    import peft

    from lora.io import apply_adapter

    hf = hf_gemma4(case)
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    theirs = peft.get_peft_model(
        hf, peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False)
    )
    theirs.save_pretrained(tmp_path / "adapter")
    x = tokens(2, 13)
    with torch.no_grad():
        expected = theirs.eval()(x).logits
        for merge in (False, True):
            ours = apply_adapter(ours_from(hf_gemma4(case)), tmp_path / "adapter", merge=merge)
            atol = 3e-5 if "hidden_size_per_layer_input" in CASES[case] else 1e-5  # as in the test above
            torch.testing.assert_close(ours(x), expected, rtol=0, atol=atol * (2 if merge else 1))


def test_sharded_and_native_folders_of_gemma4_load_bit_identically(tmp_path, tok):
    """HF out in shards (with an index) and native out, of the config with every branch: both load back into the
    same tensors."""
    from gemma.formats.checkpoint import load_hf_folder, load_native_folder, save_hf, save_native

    ours = ours_from(hf_gemma4("all"))
    ids = {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0}
    save_hf(tmp_path / "hf", ours.config, ours.state_dict(), tok.model_proto, ids, shard_bytes=20_000)
    save_native(tmp_path / "native", ours.config, ours.state_dict(), tok.model_proto)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 1
    for cfg, state in (load_hf_folder(tmp_path / "hf"), load_native_folder(tmp_path / "native")):
        assert cfg == ours.config
        assert state.keys() == ours.state_dict().keys()
        assert all(torch.equal(state[k], v) for k, v in ours.state_dict().items())


@pytest.mark.parametrize(
    "case, peft_kwargs, named",
    [
        # peft writes its "all-linear" out as the module names it found, the router's `proj` among them
        ("all", {"target_modules": "all-linear"}, "json: target module '[a-z_]+' is not supported: the MoE"),
        ("moe", {"target_modules": "all-linear"}, "target module 'proj' is not supported: the MoE experts and router"),
        ("moe", {"target_modules": "all-linear", "written": True}, "'all-linear' on this model also adapts the MoE"),
        ("moe", {"target_modules": [], "target_parameters": ["experts.gate_up_proj"]}, "experts stay frozen"),
        ("moe", {"target_modules": ["q_proj", "experts"]}, "'experts' is not supported: the MoE experts"),
        ("E", {"target_modules": ["per_layer_input_gate"]}, "per-layer embeddings stay frozen"),
    ],
)
def test_an_adapter_on_what_stays_frozen_is_refused(case, peft_kwargs, named, tmp_path):
    """peft can adapt the experts (target_parameters), and its "all-linear" also takes the router and the
    per-layer embeddings' projections: we keep those frozen, and such an adapter is refused by name."""
    import json

    import peft

    from gemma.errors import GemmaError
    from lora.io import load_adapter

    hf = hf_gemma4(case)
    kwargs = dict(peft_kwargs)
    written = kwargs.pop("written", False)  # target_modules as a file may say it (peft resolves it first)
    if written or kwargs["target_modules"] and kwargs["target_modules"] != "all-linear":  # peft refuses these
        config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 2, **kwargs}
        (tmp_path / "a").mkdir()
        (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(config))
    else:
        peft.get_peft_model(hf, peft.LoraConfig(r=2, task_type="CAUSAL_LM", **kwargs)).save_pretrained(tmp_path / "a")
    with pytest.raises(GemmaError, match=named) as info:
        load_adapter(tmp_path / "a", our_config(hf))
    assert "\n" not in str(info.value) and str(info.value).count("adapter_config.json") == 1


@pytest.mark.parametrize("case", ["E", "all"])
def test_gradient_checkpointing_gives_the_same_gradients(case):
    """Recomputing each block in the backward pass changes no gradient, though KV sharing hands keys and values
    from one block to later ones."""
    import torch.nn.functional as F

    import lora

    model = ours_from(hf_gemma4(case))
    lora.inject(model, lora.LoraConfig(r=4, alpha=8))
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora" in name:
                p.normal_(0.0, 0.1)
    model.train()
    x = tokens(2, 13)
    grads = []
    for checkpointing in (False, True):
        model.grad_checkpointing = checkpointing
        model.zero_grad()
        F.cross_entropy(model(x).flatten(0, 1), torch.roll(x, -1, dims=1).flatten()).backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 2 * projection_count(model.config)
    for name, g in grads[0].items():
        assert torch.equal(g, grads[1][name]), name


# ---- generation and training from a folder ---------------------------------------------------------------------


@pytest.fixture(scope="module", params=["k=v", "all"])
def gemma4_folder(request, tmp_path_factory, tiny_tokenizer_path):
    """A tiny Gemma 4 HF folder (the keys-equal-values case, and the one with every branch) with the tiny
    tokenizer (640 pieces: vocab 1024)."""
    from conftest import hf_folder

    folder = tmp_path_factory.mktemp("gemma4") / "model"
    return hf_folder(hf_gemma4(request.param, vocab=1024), folder, tiny_tokenizer_path)


def test_a_left_padded_batch_generates_what_each_prompt_does_alone(gemma4_folder):
    import gemma

    model, tok = gemma.load(gemma4_folder)
    prompts = [tok.encode("one two three"), tok.encode("a longer prompt than the first one, past the window")]
    assert len(prompts[0]) != len(prompts[1])
    together = gemma.generate(model, tok, prompts, max_new_tokens=8, stop_ids=[])
    alone = [gemma.generate(model, tok, [p], max_new_tokens=8, stop_ids=[])[0] for p in prompts]
    assert together == alone and all(len(ids) == 8 for ids in together)


def test_a_folder_with_only_tokenizer_json_loads_and_chats(gemma4_folder, tmp_path):
    """The hub's Gemma 4 repos ship tokenizer.json (BPE) rather than tokenizer.model: such a folder loads, its chat
    prompts are Gemma 4's, and generation stops at its stop ids."""
    import shutil

    import gemma
    from tiny_tokenizer import build_gemma4_tokenizer_json

    folder = tmp_path / "hub"
    shutil.copytree(gemma4_folder, folder)
    (folder / "tokenizer.model").unlink()
    build_gemma4_tokenizer_json(folder)
    model, tok = gemma.load(folder)
    assert tok.chat_format == 4 and set(tok.files) == {"tokenizer.json"}
    prompt = tok.apply_chat([{"role": "user", "content": "one two three"}], enable_thinking=True)
    assert prompt[:2] == [tok.bos_id, tok.start_of_turn_id] and tok.marker_id("<|think|>") in prompt
    out = gemma.generate(model, tok, [prompt], max_new_tokens=6)
    assert 1 <= len(out[0]) <= 6
    from gemma.formats.convert import convert

    convert(folder, tmp_path / "native", "native")  # the tokenizer.json goes with the model
    assert (tmp_path / "native" / "tokenizer.json").read_bytes() == (folder / "tokenizer.json").read_bytes()
    again, tok2 = gemma.load(tmp_path / "native")
    assert tok2.apply_chat([{"role": "user", "content": "one two three"}], enable_thinking=True) == prompt


def test_sft_trains_a_gemma4_folder_and_refuses_fp16(gemma4_folder, tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    import gemma

    root = Path(__file__).resolve().parent.parent
    data = root / "examples" / "arith_train.jsonl"

    def sft(*args):
        cmd = [sys.executable, "-m", "train.sft", "--model", gemma4_folder, "--data", data, *args]
        env = {**os.environ, "PYTHONPATH": str(root)}
        return subprocess.run(list(map(str, cmd)), capture_output=True, text=True, env=env, cwd=root, timeout=600)

    run = sft("--max-steps", 2, "--batch-size", 2, "--precision", "fp32", "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr
    model, _ = gemma.load(gemma4_folder, adapter=tmp_path / "run" / "adapter")
    assert sum("lora" in n for n, _ in model.named_parameters()) == 2 * projection_count(model.config)
    refused = sft("--max-steps", 1, "--precision", "fp16", "--out", tmp_path / "fp16")
    assert refused.returncode == 2 and "exceed fp16's largest value" in refused.stderr.strip().splitlines()[-1]


# ---- presets ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, published", [("4-e2b", 4.63), ("4-e4b", 7.46), ("4-12b", 11.91), ("4-26b-a4b", 25.23), ("4-31b", 30.70)]
)
def test_presets_have_the_published_parameter_counts_and_transformers_tensors(name, published):
    """Each preset, built on the meta device, has the published text parameter count, and transformers' model from
    our config.json of it has the same tensors by name and shape."""
    from gemma.formats.hf_config import from_hf_config, to_hf_config
    from gemma.model import Gemma, preset

    cfg = preset(name)
    hf_cfg = to_hf_config(cfg)
    with torch.device("meta"):
        ours = Gemma(cfg)
        theirs = tf.Gemma4ForCausalLM(tf.Gemma4TextConfig(**hf_cfg))
    n = sum(p.numel() for p in ours.parameters())
    assert round(n / 1e9, 2) == published
    mine = {hf_names(cfg)[k]: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert mine == {k: tuple(v.shape) for k, v in theirs.state_dict().items() if k != "lm_head.weight"}
    assert from_hf_config(hf_cfg) == cfg
    assert cfg.hf_repo.startswith("google/gemma-4-")
