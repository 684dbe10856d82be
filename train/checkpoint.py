"""Training checkpoints: everything a resumed run needs to continue bit-identically, written atomically.

DIR/checkpoints/step-NNNNNNN/ holds `adapter/` (PEFT format, usable as is) and `state.pt`: the trainable
tensors, optimizer, gradient scaler, the step and the position in the data, and every RNG state.

Under torchrun (train.distributed) `state.pt` is rank 0's, and each process adds `rank-RRRRR.pt` with what it alone
holds: its RNG state and, under FSDP, its shards of the adapter and the optimizer state (then absent from
`state.pt`). `state.pt["layout"]` records the number of processes and whether the state is sharded; a checkpoint
resumes only under the same layout.
"""

from __future__ import annotations

import os
import random
import re
import shutil
from contextlib import contextmanager
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


def rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


def save_checkpoint(run_dir: Path, step: int, state: dict[str, Any], write_adapter, keep_last: int,
                    own: dict[str, Any] | None = None, d=None) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest `keep_last`.

    Under torchrun (`d` a train.distributed.Dist with a process group) every process calls this with its `own`
    state; rank 0 also writes `state` and calls `write_adapter`, and gives the folder its final name once every
    process has written. No process returns before that.
    """
    dst = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    if d is None or not d.enabled:
        with atomic_dir(dst, force=True) as tmp:
            torch.save(state, tmp / "state.pt")
            write_adapter(tmp / "adapter")
        _prune(run_dir, keep_last)
        return dst
    tmp = dst.parent / f".{dst.name}.tmp"
    with d.agreed_errors(), _as_user_error(tmp):
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    with d.agreed_errors(), _as_user_error(tmp):
        _save_atomic(own, tmp / rank_file(d.rank))
        if d.main:
            _save_atomic(state, tmp / "state.pt")
            write_adapter(tmp / "adapter")
    with d.agreed_errors(), _as_user_error(dst):
        if d.main:
            old = dst.parent / f".{dst.name}.old"
            if dst.exists():
                shutil.rmtree(old, ignore_errors=True)
                os.replace(dst, old)
            os.replace(tmp, dst)
            shutil.rmtree(old, ignore_errors=True)
            _prune(run_dir, keep_last)
    return dst


def _prune(run_dir: Path, keep_last: int) -> None:
    for old in checkpoint_dirs(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def _save_atomic(obj, path: Path) -> None:
    part = path.with_name(f".{path.name}.part")
    torch.save(obj, part)
    os.replace(part, path)


@contextmanager
def _as_user_error(where: Path):
    try:
        yield
    except OSError as exc:  # a full disk or a lost mount: say where, without a traceback
        raise GemmaError(f"{where}: cannot write the checkpoint ({exc.strerror or exc})") from None


def load_checkpoint(path: Path, rank: int | None = None) -> dict[str, Any]:
    """state.pt; with `rank`, that process's file under "own" as well (missing when another layout wrote it)."""
    saved = _load(Path(path) / "state.pt")
    if rank is not None and (Path(path) / rank_file(rank)).exists():
        saved["own"] = _load(Path(path) / rank_file(rank))
    return saved


def _load(file: Path) -> dict[str, Any]:
    try:
        return torch.load(file, map_location="cpu", weights_only=False)
    except Exception as exc:  # a corrupt pickle raises many types
        raise GemmaError(f"{file}: cannot read the checkpoint ({type(exc).__name__}: {exc})") from None


def _describe(layout: dict[str, Any]) -> str:
    world = layout["world"]
    return f"{world} process{'es' if world > 1 else ''}" + (" with --distributed fsdp" if layout["sharded"] else "")


def check_layout(saved: dict[str, Any], layout: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint written by another number of processes, or sharded (FSDP) where this run is not.

    The global batch, the data each process reads, its RNG state and, under FSDP, its shards all depend on them.
    """
    was = saved.get("layout", {"world": 1, "sharded": False})
    if was != layout:
        raise GemmaError(f"{where}: written by {_describe(was)}; this run has {_describe(layout)}. Resume with the "
                         f"same number of processes and the same --distributed")
    if (layout["world"] > 1 or layout["sharded"]) and "own" not in saved:
        raise GemmaError(f"{where}: incomplete checkpoint (no file for this process)")
