"""Writing outputs so that nothing already written is lost or half-written.

`check_writable` tries an output's folder before the work, `write_atomically` puts a file in place by a temporary
name and a rename, `install` puts a finished folder in place (swapping it with the old one in one step where Linux
can), and `clean_leftovers` removes what a process killed part-way through either left behind. The temporary names
are `.NAME.tmp-PID` and `.NAME.old-PID` beside NAME; one whose process no longer runs on this machine is a
leftover. `finite_json` keeps NaN and infinities (which JSON lacks) out of what we write.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import functools
import math
import os
import re
import shutil
import stat
from pathlib import Path
from typing import Any

from gemma.errors import GemmaError
from gemma.files import describe_mode


def finite_json(value: Any) -> Any:
    """`value` with every NaN or infinity replaced by None, so that `json.dumps(..., allow_nan=False)` writes JSON
    (Python's json would write bare NaN / Infinity, which no JSON reader takes)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_json(v) for v in value]
    return value


_LEFTOVER = re.compile(r"\.(?P<name>.+)\.(?P<kind>tmp|old)-(?P<pid>[0-9]+)")


def temporary_path(dst: Path, kind: str = "tmp") -> Path:
    """`.NAME.tmp-PID` (or `.NAME.old-PID`) beside `dst`: where this process builds `dst`, or parks the old one."""
    return dst.parent / f".{dst.name}.{kind}-{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process `pid` runs on this machine (another user's counts). A PID that has been reused since its
    writer died looks alive too: its leftover then stays until that process ends, which errs on the safe side."""
    if pid == os.getpid():
        return False  # our own name: left by an earlier process that had our PID, or by an earlier failure of ours
    if pid <= 0:
        return True  # not a name we give; leave it alone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except (OverflowError, OSError):
        return False  # past any PID this system hands out
    return True


def remove_path(path: Path) -> None:
    """Remove a file, link or folder tree; what cannot be removed stays (a best effort, never an error)."""
    try:
        if _is_folder(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink()
    except OSError:
        pass


def clean_leftovers(dst: Path) -> None:
    """Remove the temporaries that dead processes left beside `dst`, and put back an old `dst` that a process
    killed between the two renames of a replacement (see `install`) had parked while `dst` is missing.

    Only names of the form `.NAME.tmp-PID` / `.NAME.old-PID` for this very NAME are touched, and only when no
    process with that PID runs: a live writer's folder is never removed."""
    dst = Path(dst)
    try:
        entries = list(os.scandir(dst.parent))
    except OSError:
        return
    stale: dict[str, list[Path]] = {"tmp": [], "old": []}
    for entry in entries:
        m = _LEFTOVER.fullmatch(entry.name)
        if m and m["name"] == dst.name and not process_alive(int(m["pid"])):
            stale[m["kind"]].append(Path(entry.path))
    olds = stale["old"]
    if olds and not os.path.lexists(dst):

        def changed(p: Path) -> float:
            try:
                return p.lstat().st_mtime
            except OSError:
                return 0.0

        newest = max(olds, key=changed)
        try:
            os.rename(newest, dst)
            olds.remove(newest)
        except OSError:
            pass
    for path in stale["tmp"] + olds:
        remove_path(path)


@functools.cache
def _renameat2():
    """libc's renameat2, or None (not Linux, or a C library without it)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux renameat2 with RENAME_EXCHANGE). False where the system
    or the file system cannot (the caller then renames twice); an OSError for any other failure."""
    fn = _renameat2()
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def sync_tree(path: Path) -> None:
    """fsync every file under `path` and the folders holding them, so that a rename done next cannot reach the
    disk before the data does (a power cut would otherwise leave the new name over empty files)."""
    paths = [path] if not path.is_dir() else [*(p for p in path.rglob("*") if not p.is_symlink()), path]
    for p in paths:
        _fsync(p)


def _fsync(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a folder; the data is as safe as they make it
        pass
    finally:
        os.close(fd)


def install(tmp: Path, dst: Path) -> None:
    """Put the finished `tmp` (a file or a folder) in place at `dst`, replacing what is there.

    An existing `dst` is swapped with `tmp` in one step where Linux can (then `tmp` holds the old one, removed
    next), so no moment ever lacks `dst`. Elsewhere the old one is first renamed to `.NAME.old-PID`; a failure
    of the second rename puts it back, and a kill between the two leaves it for `clean_leftovers` to restore."""
    if os.path.lexists(dst) and (_is_folder(tmp) or _is_folder(dst)):  # a rename cannot replace these in one go
        if exchange(tmp, dst):
            remove_path(tmp)
            _fsync(dst.parent)
            return
        old = temporary_path(dst, "old")
        remove_path(old)
        os.replace(dst, old)
        try:
            os.replace(tmp, dst)
        except BaseException:
            os.replace(old, dst)
            raise
        remove_path(old)
    else:
        os.replace(tmp, dst)  # a file over a file (or over nothing): one atomic rename
    _fsync(dst.parent)


def _is_folder(path: Path) -> bool:
    return path.is_dir() and not path.is_symlink()


def write_atomically(path: str | os.PathLike, data: str | bytes) -> Path:
    """Write a file by a temporary name beside it, synced, then renamed into place: an earlier file at `path` is
    replaced whole or not at all. A failure (a full disk, a read-only folder) removes the temporary file and is
    a GemmaError naming `path`."""
    return write_files_atomically({path: data})[0]


def write_files_atomically(files: dict[str | os.PathLike, str | bytes]) -> list[Path]:
    """`write_atomically` for several files that belong together (a summary and its details): every one is
    written and synced under its temporary name before any is renamed into place, so a full disk replaces none."""
    done: list[tuple[Path, Path]] = []
    try:
        for name, data in files.items():
            path = Path(name)
            _refuse_special(path)
            tmp = temporary_path(path)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                clean_leftovers(path)
                remove_path(tmp)
                done.append((tmp, path))
                with open(tmp, "xb") as f:
                    f.write(data.encode("utf-8") if isinstance(data, str) else data)
                    f.flush()
                    os.fsync(f.fileno())
            except OSError as exc:
                raise GemmaError(f"{path}: cannot write ({(exc.strerror or str(exc)).lower()})") from None
        for tmp, path in done:
            try:
                install(tmp, path)
            except OSError as exc:
                raise GemmaError(f"{path}: cannot write ({(exc.strerror or str(exc)).lower()})") from None
    finally:
        for tmp, _ in done:
            remove_path(tmp)  # gone already once installed
    return [path for _, path in done]


def _refuse_special(path: Path) -> None:
    """A folder, device or FIFO where an output file goes is refused, never replaced (root could replace
    /dev/null)."""
    try:
        mode = path.stat().st_mode
    except (OSError, ValueError):
        return
    if not stat.S_ISREG(mode):
        raise GemmaError(
            f"{path}: is {'a folder' if stat.S_ISDIR(mode) else describe_mode(mode)}, not a file; not replaced"
        )


def check_writable(path: str | os.PathLike, flag: str) -> Path:
    """Fail now, before hours of work, if the file `path` cannot be written later: it is a folder, a device or a
    FIFO, or its folder cannot be created or written (read-only, no permission). Creates the folder, and creates
    and removes an empty temporary file in it. A disk that fills up later is still found when writing."""
    p = Path(path).expanduser()
    try:
        mode = p.stat().st_mode
    except (OSError, ValueError):
        mode = None
    if mode is not None and stat.S_ISDIR(mode):
        raise GemmaError(f"{p}: {flag} names a folder, not a file")
    if mode is not None and not stat.S_ISREG(mode):
        raise GemmaError(f"{p}: {flag} names {describe_mode(mode)}, not a file; the output would replace it")
    probe = temporary_path(p)
    above = next((q for q in p.parents if os.path.lexists(q)), None)
    if above is not None and not above.is_dir():
        raise GemmaError(f"{p}: {flag} cannot be written there ({above} is a file, not a folder)")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
        os.unlink(probe)
    except OSError as exc:
        raise GemmaError(f"{p}: {flag} cannot be written there ({(exc.strerror or str(exc)).lower()})") from None
    return p
