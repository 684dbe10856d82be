"""Training checkpoints: everything a resumed run needs to continue bit-identically, written atomically.

DIR/checkpoints/step-NNNNNNN/ holds `adapter/` (PEFT format, usable as is) and `state.pt`: the trainable
tensors, optimizer, gradient scaler, the step and the position in the data, and every RNG state.

Under torchrun (train.distributed) `state.pt` is rank 0's, and each process adds `rank-RRRRR.pt` with what it alone
holds: its RNG state and, under FSDP, its shards of the adapter and the optimizer state (then absent from
`state.pt`). `state.pt["layout"]` records the number of processes and whether the state is sharded; a checkpoint
resumes only under the same layout.

A checkpoint holds tensors and plain data only (numbers, strings, lists, tuples, dicts: numpy's RNG state too is
stored as a list of ints), and is read back with `torch.load(weights_only=True)`: a file that holds anything else,
such as a pickle planted to run code when loaded, is refused before any of it runs.

A save killed part-way leaves temporary folders beside the checkpoints; `recover` clears them at the next start.
"""

from __future__ import annotations

import os
import pickle
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gemma.formats.checkpoint import atomic_dir
from gemma.errors import GemmaError
from gemma.files import regular_file
from gemma.writing import process_alive

_NAME = re.compile(r"^step-(\d{7,})$")
# What a killed save leaves: `.step-N.tmp` / `.step-N.old` (the torchrun path below) and atomic_dir's
# `.step-N.tmp-PID` / `.step-N.old-PID`.
_LEFTOVER = re.compile(r"^\.(step-\d{7,})\.(tmp|old)(?:-(\d+))?$")


def rng_state() -> dict[str, Any]:
    """Every RNG state the run draws from, as tensors and plain values: python's as (version, tuple of ints, gauss),
    numpy's as (name, key as a list of ints, position, has_gauss, cached_gaussian)."""
    name, key, pos, has_gauss, cached = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": (str(name), key.tolist(), int(pos), int(has_gauss), float(cached)),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, key, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(key, dtype=np.uint32), pos, has_gauss, cached))
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


def save_checkpoint(
    run_dir: Path,
    step: int,
    state: dict[str, Any],
    write_adapter,
    keep_last: int,
    own: dict[str, Any] | None = None,
    d=None,
    output: str = "adapter",
) -> Path:
    """Write checkpoints/step-N atomically, then drop all but the newest `keep_last`.

    Under torchrun (`d` a train.distributed.Dist with a process group) every process calls this with its `own`
    state; rank 0 also writes `state` and calls `write_adapter`, and gives the folder its final name once every
    process has written. No process returns before that.
    """
    dst = Path(run_dir) / "checkpoints" / f"step-{step:07d}"
    if d is None or not d.enabled:
        with writing(dst, "checkpoint"), atomic_dir(dst, force=True) as tmp:
            _save(state, tmp / "state.pt")
            write_adapter(tmp / output)
        _prune(run_dir, keep_last)
        return dst
    tmp = dst.parent / f".{dst.name}.tmp"
    with d.agreed_errors(), writing(tmp, "checkpoint"):
        if d.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
    with d.agreed_errors(), writing(tmp, "checkpoint"):
        _save_atomic(own, tmp / rank_file(d.rank))
        if d.main:
            _save_atomic(state, tmp / "state.pt")
            write_adapter(tmp / output)
    # A kill between the two renames leaves `.step-N.old` complete and no step-N: `recover` renames it back.
    with d.agreed_errors(), writing(dst, "checkpoint"):
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


def _save(obj, path: Path) -> None:
    # Through a file of ours: torch.save given a path reports a full disk as a RuntimeError ("unexpected pos"),
    # given a file object as the OSError it is.
    with open(path, "wb") as f:
        torch.save(obj, f)


def _save_atomic(obj, path: Path) -> None:
    part = path.with_name(f".{path.name}.part")
    _save(obj, part)
    os.replace(part, path)


@contextmanager
def writing(where: Path, what: str):
    """A failed write (a full disk, a read-only or lost mount) as a GemmaError naming `where`, without a traceback
    (gemma.formats.checkpoint.save_safetensors turns safetensors' own error for it into the OSError it is)."""
    try:
        yield
    except OSError as exc:
        raise GemmaError(f"{where}: cannot write the {what} ({exc.strerror or exc})") from None


def recover(run_dir: Path) -> None:
    """Clear what killed saves left in DIR/checkpoints (rank 0, at the start of a run, before looking for one).

    A save renames the previous folder of its step aside (`.step-N.old`), then the new one into place: a kill
    between the two renames leaves no step-N but a complete `.old`, which is renamed back. Every other leftover
    (`.tmp`, or an `.old` whose step exists) is removed; a `-PID` one only when that process is gone."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return
    for p in sorted(root.iterdir()):
        found = _LEFTOVER.match(p.name)
        if found is None:
            continue
        name, kind, pid = found.groups()
        if pid is not None and process_alive(int(pid)):
            continue  # another process's save in progress (two runs in one folder)
        final = root / name
        if kind == "old" and not final.exists() and (p / "state.pt").is_file() and _has_output(p):
            os.replace(p, final)
        elif p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


def _has_output(folder: Path) -> bool:
    """Whether a checkpoint folder holds what a run writes: its adapter, or under --full its model folder."""
    return (folder / "adapter").is_dir() or (folder / "model").is_dir()


def load_checkpoint(path: Path, rank: int | None = None) -> dict[str, Any]:
    """state.pt; with `rank`, that process's file under "own" as well (missing when another layout wrote it)."""
    saved = _load(Path(path) / "state.pt")
    if rank is not None and (Path(path) / rank_file(rank)).exists():
        saved["own"] = _load(Path(path) / rank_file(rank))
    return saved


# torch names what its weights-only unpickler refused in one of several phrasings, by version and by cause:
# "Unsupported global: GLOBAL numpy.dtype was not an allowed global ...", "unsupported GLOBAL posix.system whose
# module posix is blocked", "Unsupported operand 82" ...
_UNSAFE = re.compile(r"unsupported (?:global: )?GLOBAL (\S+)", re.IGNORECASE)


def _load(file: Path) -> dict[str, Any]:
    """A checkpoint file, read with weights_only: tensors and plain data, never code."""
    regular_file(file, "checkpoint")
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        # torch's message goes on to advise weights_only=False, which is the very thing to avoid: never shown.
        unsafe = _UNSAFE.search(str(exc))
        if unsafe is None:
            raise GemmaError(f"{file}: cannot read the checkpoint (corrupt, or not tensors and plain data)") from None
        raise GemmaError(
            f"{file}: refused: holds more than tensors and plain data ({unsafe.group(1)}), which no "
            "checkpoint of this version does (tampered with, or written by an older version)"
        ) from None
    except OSError as exc:
        raise GemmaError(f"{file}: cannot read the checkpoint ({exc.strerror or exc})") from None
    except Exception as exc:  # a corrupt or truncated file raises many types
        raise GemmaError(
            f"{file}: cannot read the checkpoint ({type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else 'corrupt'})"
        ) from None
    if not isinstance(saved, dict):
        raise GemmaError(f"{file}: not a training checkpoint (holds {type(saved).__name__})")
    return saved


def _describe(layout: dict[str, Any]) -> str:
    world = layout["world"]
    return f"{world} process{'es' if world > 1 else ''}" + (" with --distributed fsdp" if layout["sharded"] else "")


def check_layout(saved: dict[str, Any], layout: dict[str, Any], where: Path) -> None:
    """Refuse a checkpoint written by another number of processes, or sharded (FSDP) where this run is not.

    The global batch, the data each process reads, its RNG state and, under FSDP, its shards all depend on them.
    """
    was = saved.get("layout", {"world": 1, "sharded": False})
    if was != layout:
        raise GemmaError(
            f"{where}: written by {_describe(was)}; this run has {_describe(layout)}. Resume with the "
            f"same number of processes and the same --distributed"
        )
    if (layout["world"] > 1 or layout["sharded"]) and "own" not in saved:
        raise GemmaError(f"{where}: incomplete checkpoint (no file for this process)")
