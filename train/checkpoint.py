"""Training checkpoints: everything a resumed run needs to continue bit-identically, written atomically.

DIR/checkpoints/step-NNNNNNN/ holds `adapter/` (PEFT format, usable as is) and `state.pt`: the trainable
tensors, optimizer, gradient scaler, the step and the position in the data, and every RNG state.
"""

from __future__ import annotations

import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma.checkpoint import atomic_dir
from gemma.errors import GemmaError

_NAME = re.compile(r"^step-(\d{7,})$")


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def checkpoint_dirs(run_dir: Path) -> list[Path]:
    """Complete checkpoints, oldest first (a half-written one never has its final name)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _NAME.match(p.name) and (p / "state.pt").exists()]
    return sorted(found, key=lambda p: int(_NAME.match(p.name).group(1)))


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], write_adapter, keep_last: int) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest `keep_last`."""
    dst = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    with atomic_dir(dst, force=True) as tmp:
        torch.save(state, tmp / "state.pt")
        write_adapter(tmp / "adapter")
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return dst


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(Path(path) / "state.pt", map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt pickle raises many types
        raise GemmaError(f"{path}/state.pt: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None
