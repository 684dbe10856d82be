"""The LoRA configuration: one dataclass, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass

from gemma.errors import GemmaError

# The seven projections of a Gemma block, by their native module names (`layers.N.attn.q`, `layers.N.mlp.down`).
ATTN_TARGETS = ("q", "k", "v", "o")
MLP_TARGETS = ("gate", "up", "down")
ALL_TARGETS = ATTN_TARGETS + MLP_TARGETS


@dataclass
class LoraConfig:
    r: int = 16  # rank of the update B @ A
    alpha: float = 32.0  # the update is scaled by alpha / r (alpha / sqrt(r) with rslora)
    dropout: float = 0.0  # dropout on the LoRA branch's input, training only
    targets: tuple[str, ...] = ALL_TARGETS  # which projections get an adapter, in every layer
    rslora: bool = False  # rank-stabilised scaling alpha / sqrt(r)
    dora: bool = False  # weight-decomposed LoRA: a trainable per-output-row magnitude

    def __post_init__(self):
        if isinstance(self.targets, str):  # "q,k,v" as the command line spells it
            self.targets = tuple(t.strip() for t in self.targets.split(",") if t.strip())
        # Canonical order, no duplicates: the config compares equal however the targets were listed.
        targets = tuple(self.targets)
        unknown = [t for t in targets if t not in ALL_TARGETS]
        if unknown:
            raise GemmaError(f"LoRA: unknown target {unknown[0]!r}; choose from {','.join(ALL_TARGETS)}")
        if not targets:
            raise GemmaError("LoRA: no target modules")
        self.targets = tuple(t for t in ALL_TARGETS if t in targets)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise GemmaError(f"LoRA: rank r must be a positive integer, got {self.r!r}")
        if (
            isinstance(self.alpha, bool)
            or not isinstance(self.alpha, (int, float))
            or not math.isfinite(self.alpha)
            or self.alpha <= 0
        ):
            raise GemmaError(f"LoRA: alpha must be a positive number, got {self.alpha!r}")
        if (
            isinstance(self.dropout, bool)
            or not isinstance(self.dropout, (int, float))
            or not 0.0 <= self.dropout < 1.0
        ):
            raise GemmaError(f"LoRA: dropout must be in [0, 1), got {self.dropout!r}")

    @property
    def scale(self) -> float:
        """The factor on B @ A: alpha / r, or alpha / sqrt(r) with rslora (as peft computes it)."""
        return self.alpha / math.sqrt(self.r) if self.rslora else self.alpha / self.r
