"""The bookkeeping of one optimizer step, apart from the model: the run state, the update with its policies for
steps that cannot be applied, the cadence of what follows a step (log, eval, save), and the tokens/s window.

Kept apart from train.loop so that each decision is a small function that a test can call without a model.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from train.distributed import AgreedError

NONFINITE_LIMIT = 2  # consecutive non-finite losses (fp32/bf16) that stop the run
FP16_SKIP_LIMIT = 25  # consecutive overflowing fp16 steps that stop the run


@dataclass
class RunState:
    """What advances during training and is saved in checkpoints."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the data
    batch_in_epoch: int = 0  # optimizer steps done within the current epoch
    best_eval: float = math.inf
    skipped: int = 0  # steps whose update was skipped (non-finite loss or fp16 overflow)
    history: list = field(default_factory=list)  # (step, train loss, eval loss or None) for the plot


@dataclass
class BadSteps:
    """Consecutive steps whose update was not applied, and when they stop the run.

    In fp32 and bf16 a non-finite loss skips the update here; two in a row stop the run. In fp16 the gradient
    scaler decides: it skips an overflowing update and lowers its scale, which is normal a few times; 25 in a row
    stop the run. The loss is global under torchrun, so every process stops at the same step (an AgreedError,
    which rank 0 reports).
    """

    precision: str
    streak: int = 0  # steps in a row without an update

    def skips(self, loss: float) -> bool:
        """Whether this step's update is skipped before the optimizer sees it (fp16 leaves that to the scaler)."""
        return not math.isfinite(loss) and self.precision != "fp16"

    def nonfinite(self, step: int, last_checkpoint: Callable[[], Path | None] = lambda: None) -> None:
        """Count a skipped non-finite step (`step` counted from 1); raises at the limit."""
        self.streak += 1
        if self.streak >= NONFINITE_LIMIT:
            last = last_checkpoint()
            raise AgreedError(
                f"non-finite loss at {self.streak} steps in a row (step {step}); stopped. "
                f"Last good checkpoint: {last if last is not None else 'none'}"
            )

    def overflow(self) -> None:
        """Count an update the fp16 scaler skipped; raises at the limit."""
        self.streak += 1
        if self.streak >= FP16_SKIP_LIMIT:
            raise AgreedError(f"fp16 overflow at {self.streak} steps in a row; use --precision bf16")

    def applied(self) -> None:
        self.streak = 0


def apply_update(optimizer, scaler, clip: Callable[[float], float], max_grad_norm: float) -> tuple[float, bool]:
    """Unscale, clip (0: no limit) and step; returns (gradient norm before clipping, whether the fp16 scaler skipped
    the update because of an overflow, which it shows by lowering its scale)."""
    scaler.unscale_(optimizer)  # exactly once per optimizer step
    grad_norm = clip(max_grad_norm or float("inf"))
    scale_before = scaler.get_scale() if scaler.is_enabled() else None
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm, scaler.is_enabled() and scaler.get_scale() < scale_before


def update(
    bad: BadSteps,
    optimizer,
    scaler,
    clip: Callable[[float], float],
    loss: float,
    max_grad_norm: float,
    step: int,
    last_checkpoint: Callable[[], Path | None] = lambda: None,
) -> tuple[float, bool]:
    """The update of one step whose gradients are accumulated, under the policies of `bad`; returns (gradient norm,
    NaN when skipped for a non-finite loss; whether the update was skipped). `step` is this step, from 1."""
    if bad.skips(loss):
        optimizer.zero_grad(set_to_none=True)
        bad.nonfinite(step, last_checkpoint)
        return float("nan"), True
    grad_norm, overflowed = apply_update(optimizer, scaler, clip, max_grad_norm)
    if overflowed:
        bad.overflow()
    else:
        bad.applied()
    return grad_norm, overflowed


@dataclass(frozen=True)
class Cadence:
    """What follows optimizer step `step`."""

    log: bool  # write a metrics line
    eval: bool  # compute the eval loss (and keep the best adapter)
    save: bool  # a periodic checkpoint (the last step's is saved after the loop)
    last: bool  # the run's last step


def cadence(step: int, total_steps: int, log_every: int, eval_every: int, save_every: int, has_eval: bool) -> Cadence:
    """The cadence after step `step` (from 1): every N steps by the flags (0: never), and always at the last step,
    which is logged and evaluated but not saved here."""
    last = step == total_steps
    return Cadence(
        log=step % log_every == 0 or last,
        eval=has_eval and (bool(eval_every and step % eval_every == 0) or last),
        save=bool(save_every and step % save_every == 0) and not last,
        last=last,
    )


class Window:
    """The tokens trained on since the last metrics line, and since when: tokens_per_s."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.tokens, self.start = 0, time.perf_counter()

    def add(self, tokens: float) -> None:
        self.tokens += tokens

    def rate(self) -> float:
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)


def metrics_record(
    state: RunState,
    loss: float,
    lr: float,
    grad_norm: float,
    tokens_per_s: float,
    steps_in_epoch: int,
    device: torch.device,
) -> dict:
    """The metrics line of the step `state` has just done."""
    record = {
        "step": state.step,
        "epoch": state.epoch + state.batch_in_epoch / max(steps_in_epoch, 1),
        "loss": loss,
        "lr": lr,
        "grad_norm": grad_norm,
        "tokens_per_s": tokens_per_s,
        "skipped_steps": state.skipped,
    }
    if device.type == "cuda":
        record["memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9  # rank 0's peak
    return record
