"""Injection by module replacement, merging over a whole model, and the trainable-parameter summary."""

from __future__ import annotations

import torch
from torch import nn

from gemma.errors import GemmaError
from gemma.model import Gemma
from lora.config import ATTN_TARGETS, LoraConfig
from lora.layer import LoRALinear


def module_path(layer: int, target: str) -> str:
    """The native module path of a projection: (0, "q") -> "layers.0.attn.q", (1, "down") -> "layers.1.mlp.down"."""
    return f"layers.{layer}.{'attn' if target in ATTN_TARGETS else 'mlp'}.{target}"


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """The LoRA layers of a model by native module path, in model order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def inject(model: Gemma, cfg: LoraConfig) -> Gemma:
    """Replace the target projections of every layer with LoRA layers (in place; returns the model); a layer
    without one of them (no `v` on Gemma 4's keys-equal-values layers) goes without.

    The base weights are shared, not copied, and frozen along with every other base parameter (embedding, norms):
    afterwards only the adapter parameters are trainable. `model.lora_config` records `cfg`.
    """
    if lora_layers(model):
        raise GemmaError("the model already has LoRA layers")
    for p in model.parameters():
        p.requires_grad_(False)
    for i in range(len(model.layers)):
        for target in cfg.targets:
            parent_path, _, name = module_path(i, target).rpartition(".")
            parent = model.get_submodule(parent_path)
            base = getattr(parent, name)
            if base is None:  # a projection the layer lacks (Gemma 4's keys-equal-values layers have no v)
                continue
            setattr(parent, name, LoRALinear.from_linear(base, cfg.r, cfg.scale, cfg.dropout, cfg.dora))
    model.lora_config = cfg
    return model


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter parameters by native name (`layers.0.attn.q.lora_A`, ...), detached."""
    return {
        f"{path}.{name}": p.detach()
        for path, layer in lora_layers(model).items()
        for name, p in layer.adapter_parameters().items()
    }


def merge(model: nn.Module) -> nn.Module:
    """Fold every LoRA update into its base weight, in place. Idempotent."""
    for layer in lora_layers(model).values():
        layer.merge()
    return model


def unmerge(model: nn.Module) -> nn.Module:
    """Undo `merge`, in place. Idempotent."""
    for layer in lora_layers(model).values():
        layer.unmerge()
    return model


def _human(n: int) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def summary(model: nn.Module) -> str:
    """One line: trainable vs total parameters, e.g. `trainable 1.47M / 270M (0.545%)`."""
    params = {id(p): p for p in model.parameters()}.values()  # a tied parameter counts once
    # A base stored quantized (gemma.model.base_quant) holds its weights as buffers: counted by their shape.
    stored = sum(m.shape.numel() for m in model.modules() if hasattr(m, "dequantize") and hasattr(m, "shape"))
    total = sum(p.numel() for p in params) + stored
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return f"trainable {_human(trainable)} / {_human(total)} ({100 * trainable / max(total, 1):.3g}%)"
