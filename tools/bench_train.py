"""The LoRA fine-tuning workload for tools/bench.py: one optimizer step of supervised fine-tuning, ours against
transformers + peft (the reference), at the same tokens per step.

Ours runs the product's training path as train.loop runs it: the frozen base in bf16, `lora.inject`, the adapter
in float32, bf16 autocast, `train.loop.accumulate` (the chunked loss over the targets, one backward), the gradient
clipped to the trainer's default norm, AdamW. The reference is what a transformers + peft user writes with the
defaults: AutoModelForCausalLM in bf16, `get_peft_model` (which keeps the adapter in float32), the model's own
`labels=` loss under bf16 autocast, backward, the same clipping, AdamW.

Both sides see the same seeded random token ids, every position a target, and start from the same adapter (A
drawn from one seeded generator in peft's Kaiming-uniform distribution, B zero), so their losses agree step for
step up to bf16 rounding: `losses` in the result shows that both trained the same thing.

tools/bench.py runs each workload in a process of its own, so `peak_memory` is the workload's own. Like
tools/bench_workloads.py, this module is outside the packages because it imports peft (and, through the reference
model, transformers).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from lora import LoraConfig, inject, lora_layers
from lora.config import ALL_TARGETS, ATTN_TARGETS
from lora.inject import module_path
from train import distributed
from train.data import Example, collate
from train.loop import LossModule, accumulate
from train.loss import IGNORE
from train.options import TrainOptions

from bench_workloads import ours, peak_memory, reference, timed

HF_TARGETS = {
    "q": "q_proj",
    "k": "k_proj",
    "v": "v_proj",
    "o": "o_proj",
    "gate": "gate_proj",
    "up": "up_proj",
    "down": "down_proj",
}
MAX_GRAD_NORM = TrainOptions.max_grad_norm  # the trainer's default clipping, on both sides


def token_ids(batch: int, seq_len: int, vocab_size: int, seed: int) -> torch.Tensor:
    """Seeded random ids (batch, seq_len) in [3, min(20000, vocab)): no special tokens."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(20000, vocab_size), (batch, seq_len), generator=g)


def adapter_init(num_layers: int, shapes: dict[tuple[int, str], tuple[int, int]], r: int, seed: int) -> dict:
    """{(layer, target): A (r, in)}, float32, drawn in a fixed order (layer by layer, targets in ALL_TARGETS'
    order) from one generator: peft's default Kaiming-uniform(a=sqrt(5)) distribution, i.e. uniform in
    +-1/sqrt(in). `shapes` maps (layer, target) -> (out, in) for each projection a layer has (Gemma 4's widths
    differ by layer kind, and its keys-equal-values layers have no v)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = {}
    for i in range(num_layers):
        for t in ALL_TARGETS:
            if (i, t) in shapes:
                fan_in = shapes[i, t][1]
                out[i, t] = (torch.rand(r, fan_in, generator=g) * 2 - 1) / math.sqrt(fan_in)
    return out


def sft_sampler(
    impl: str,
    folder: Path,
    *,
    batch: int = 4,
    seq_len: int = 512,
    warmup: int = 2,
    device: torch.device,
    r: int = 16,
    alpha: float = 32.0,
    seed: int = 0,
    lr: float = 2e-4,
):
    """(sample, losses, settings): `sample()` times one optimizer step of LoRA SFT (after `warmup` untimed ones,
    run here) and returns its tokens/s; `losses` gathers every step's loss."""
    torch.manual_seed(seed)
    run = {"ours": _ours_step, "reference": _reference_step}.get(impl)
    if run is None:
        raise ValueError(f"unknown implementation {impl!r}: ours or reference")
    step, settings = run(folder, batch, seq_len, device, r, alpha, seed, lr)
    losses: list[float] = []
    for _ in range(warmup):
        losses.append(step())

    def sample() -> float:
        return batch * seq_len / timed(lambda: losses.append(step()), device)

    return sample, losses, settings


def sft(
    impl: str,
    folder: Path,
    *,
    batch: int = 4,
    seq_len: int = 512,
    steps: int = 6,
    warmup: int = 2,
    device: torch.device,
    r: int = 16,
    alpha: float = 32.0,
    seed: int = 0,
    lr: float = 2e-4,
) -> dict:
    """Run `warmup` untimed then `steps` timed optimizer steps of LoRA SFT; returns tokens/s per timed step, the
    tokens per step, the process's peak memory, every step's loss (warmup included) and what was run."""
    sample, losses, settings = sft_sampler(
        impl, folder, batch=batch, seq_len=seq_len, warmup=warmup, device=device, r=r, alpha=alpha, seed=seed, lr=lr
    )
    rates = [sample() for _ in range(steps)]
    return {
        "tokens_per_s": rates,
        "tokens_per_step": batch * seq_len,
        "peak_memory": peak_memory(device),
        "losses": losses,
        "settings": settings,
    }


def _ours_step(folder, batch, seq_len, device, r, alpha, seed, lr):
    model = ours(folder, torch.bfloat16, device)
    cfg = model.config
    inject(model, LoraConfig(r=r, alpha=alpha, targets=ALL_TARGETS))
    for p in model.parameters():
        if p.requires_grad:  # as train.loop does: the adapter in float32 over the bf16 base
            p.data = p.data.float()
    layers = lora_layers(model)
    shapes = {
        (i, t): tuple(layers[module_path(i, t)].weight.shape)
        for i in range(cfg.num_layers)
        for t in ALL_TARGETS
        if module_path(i, t) in layers
    }
    with torch.no_grad():
        for (i, t), a in adapter_init(cfg.num_layers, shapes, r, seed).items():
            layers[module_path(i, t)].lora_A.copy_(a)
    model.grad_checkpointing = TrainOptions.grad_checkpointing
    model.train()
    replicas = distributed.Replicas(LossModule(model, "bf16"), model.layers, distributed.Dist(device=device), "bf16")
    optimizer = torch.optim.AdamW(replicas.params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = token_ids(batch, seq_len, cfg.vocab_size, seed)
    # Every position a target: the next token, none after the last (as the reference's labels= shift does).
    examples = [Example(row.tolist(), row[1:].tolist() + [IGNORE]) for row in ids]
    b = {k: v.to(device) for k, v in collate(examples, 0).items()}
    n_targets = int((b["targets"] != IGNORE).sum())

    def step() -> float:
        loss = accumulate(model, [b], n_targets, "bf16", device, None, replicas)
        replicas.clip_grad_norm(MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    settings = (
        f"ours: gemma bf16, lora r={r} alpha={alpha:g} on {','.join(ALL_TARGETS)} (fp32 adapter), bf16 "
        f"autocast, train.loop.accumulate (chunked loss), grad checkpointing "
        f"{'on' if model.grad_checkpointing else 'off'}, clip {MAX_GRAD_NORM:g}, AdamW lr {lr:g}"
    )
    return step, settings


def _reference_step(folder, batch, seq_len, device, r, alpha, seed, lr):
    import peft

    model = reference(folder, torch.bfloat16, device)
    cfg = model.config
    model = peft.get_peft_model(
        model, peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(HF_TARGETS.values()))
    )
    named = dict(model.named_modules())
    prefix = next(n.rsplit(".layers.0.", 1)[0] for n in named if n.endswith(".layers.0.self_attn.q_proj"))

    def module(i, t):
        return named.get(f"{prefix}.layers.{i}.{'self_attn' if t in ATTN_TARGETS else 'mlp'}.{HF_TARGETS[t]}")

    shapes = {
        (i, t): tuple(module(i, t).base_layer.weight.shape)
        for i in range(cfg.num_hidden_layers)
        for t in ALL_TARGETS
        if module(i, t) is not None
    }
    with torch.no_grad():
        for (i, t), a in adapter_init(cfg.num_hidden_layers, shapes, r, seed).items():
            module(i, t).lora_A["default"].weight.copy_(a)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    ids = token_ids(batch, seq_len, cfg.vocab_size, seed).to(device)
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in params})

    def step() -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    settings = (
        f"reference: transformers {cfg.model_type} bf16 ({cfg._attn_implementation} attention) + peft lora "
        f"r={r} alpha={alpha:g} on all seven projections ({'/'.join(dtypes)} adapter), bf16 autocast, "
        f"labels= loss, no grad checkpointing, clip {MAX_GRAD_NORM:g}, AdamW lr {lr:g}"
    )
    return step, settings
