"""Full fine-tuning (`--full`): the model's own weights train, no adapter, and the run writes a model folder.

The weights are float32 master weights; under `--precision bf16` autocast runs each matrix product in bf16 (its own
rounded copy of the weight, made per operation), so the update is applied to float32 values and small steps are not
lost to bf16 rounding: what "fp32 master weights with a bf16 compute copy" does, without a second resident copy.
AdamW keeps two float32 moments per trainable value, so a trainable value costs 16 bytes (weight, gradient, two
moments) against LoRA's frozen 2 (bf16 base).

`--train-modules` picks what trains, by parameter name: `embeddings` (the token embedding, tied to the output head,
and Gemma 4's per-layer embedding), `norms` (every RMSNorm's scale, the q/k norms included), `attention` (the q, k,
v, o projections), `mlp` (gate, up, down; Gemma 4's experts, router and their scales), or `all` (also Gemma 4's
per-layer-input projections). What is left out stays frozen, in float32.
"""

from __future__ import annotations

from pathlib import Path

import torch

from gemma.errors import GemmaError

MODULES = ("embeddings", "norms", "attention", "mlp")


def parse_modules(spec: str) -> tuple[str, ...]:
    """`--train-modules` as a tuple of MODULES ("all": every one)."""
    names = tuple(s.strip() for s in spec.split(",") if s.strip())
    if names == ("all",):
        return MODULES
    bad = [n for n in names if n not in MODULES]
    if bad or not names:
        raise GemmaError(
            f"--train-modules: unknown module kind {bad[0]!r}; choose from all, {', '.join(MODULES)}"
            if bad
            else "--train-modules is empty"
        )
    return names


def module_kind(name: str) -> str:
    """Which of MODULES a native parameter name belongs to ("other": Gemma 4's per-layer-input projections)."""
    parent = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]  # "q_norm" for layers.0.attn.q_norm.weight
    if parent.endswith("norm"):
        return "norms"
    if name.endswith(".embed.weight") or name == "embed.weight":
        return "embeddings"
    if ".attn." in name:
        return "attention"
    if ".mlp." in name or ".moe." in name:
        return "mlp"
    return "other"


def make_trainable(model, modules: tuple[str, ...]) -> int:
    """Set requires_grad by module kind (float32 weights for what trains); returns the trainable count."""
    everything = set(modules) == set(MODULES)
    count = 0
    for name, p in model.named_parameters():
        kind = module_kind(name)
        train = everything or kind in modules
        p.requires_grad_(train)
        if train:
            count += p.numel()
    if not count:
        raise GemmaError(f"--train-modules {','.join(modules)}: this model has no such weights to train")
    return count


def write_full_model(folder: Path, model, state: dict[str, torch.Tensor], tokenizer, fmt: str, dtype) -> None:
    """The trained model as a model folder (`fmt`: hf, which transformers loads, or native), atomically."""
    from gemma.formats.convert import write_model

    write_model(folder, fmt, model.config, state, tokenizer, dtype=dtype, force=True)
