"""Reading a user's files safely, and keeping outputs off inputs.

Every file a command reads (data, configs, checkpoints, tokenizers, adapters) goes through `regular_file` first:
a folder, a FIFO or a device (`/dev/zero`) named where a file belongs is a one-line error, not a hang or a read
that never ends. `refuse_overwriting_inputs` is called by every tool before it loads anything, so that no output
path can replace one of the command's own inputs. Writing outputs is gemma.writing's.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any

from gemma.errors import GemmaError

# JSON nested deeper than this is refused before Python's recursion limit turns it into a traceback; no config,
# record or request of ours nests more than a few levels.
MAX_JSON_DEPTH = 64


def regular_file(path: str | os.PathLike, what: str = "file") -> Path:
    """`path` as a Path, if it names a regular file (or a link to one); else a GemmaError saying what it is."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        raise GemmaError(f"{p}: no such {what}") from None
    except OSError as exc:
        raise GemmaError(f"{p}: cannot read the {what} ({exc.strerror or exc})") from None
    if stat.S_ISDIR(mode):
        raise GemmaError(f"{p}: is a folder, not a {what}")
    if not stat.S_ISREG(mode):
        raise GemmaError(f"{p}: is {describe_mode(mode)}, not a {what}")
    return p


def read_bytes(path: str | os.PathLike, what: str = "file") -> bytes:
    """The bytes of a regular file, or a one-line error."""
    p = regular_file(path, what)
    try:
        return p.read_bytes()
    except OSError as exc:
        raise GemmaError(f"{p}: cannot read the {what} ({exc.strerror or exc})") from None


def json_depth_ok(text: str, limit: int = MAX_JSON_DEPTH) -> bool:
    """Whether no array or object in `text` nests deeper than `limit` (brackets inside strings do not count).

    A linear scan; run before `json.loads`, whose recursive parser would otherwise raise RecursionError (or, in
    some builds, crash) on input like `[[[[...]]]]`."""
    depth, in_string, escaped = 0, False, False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            if depth > limit:
                return False
        elif ch in "]}":
            depth -= 1
    return True


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str, where: str) -> Any:
    """`json.loads` for files we read: a one-line error for malformed or too deeply nested JSON, and for the bare
    NaN / Infinity that Python's json accepts but JSON does not have."""
    if not json_depth_ok(text):
        raise GemmaError(f"{where}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(text, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError) as exc:
        raise GemmaError(f"{where}: not valid JSON ({exc})") from None


def read_json_file(path: str | os.PathLike, what: str = "JSON file") -> Any:
    """The JSON value of a regular UTF-8 file, or a one-line error naming the file once."""
    raw = read_bytes(path, what)
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise GemmaError(f"{path}: not UTF-8 text") from None
    return loads_strict(text, str(path))


def has_lone_surrogate(text: str) -> bool:
    """Whether `text` holds a UTF-16 surrogate code point on its own (valid in JSON as "\\ud800", but no text:
    it cannot be encoded to UTF-8, so the tokenizer cannot take it)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _real_path(path: str | os.PathLike) -> Path:
    """`path` absolute with its links resolved, as far as that is possible (a link loop stays as written)."""
    p = Path(path).expanduser()
    try:
        return p.resolve()
    except (OSError, RuntimeError, ValueError):
        return Path(os.path.abspath(p))


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names, or None if nothing is there."""
    try:
        st = path.stat()
    except (OSError, ValueError):
        return None
    return st.st_dev, st.st_ino


def _lineage(path: Path) -> list[tuple[int, int]]:
    """The identities of `path` and of every folder above it: compared by inode, a folder reached by two names
    (a bind mount, a case-insensitive file system, a hard link) is still one folder."""
    ids = (_identity(p) for p in (path, *path.parents))
    return [i for i in ids if i is not None]


def refuse_overwriting_inputs(
    outputs: dict[str, str | os.PathLike | None], inputs: dict[str, str | os.PathLike | None]
) -> None:
    """A GemmaError if writing any output could replace or delete one of the inputs.

    `outputs` and `inputs` map a flag (as the user typed it, e.g. "--out") to a path; None entries are skipped, and
    an input that is not a local path (a repo id, a preset) never matches. Refused: an output that is the same file
    as an input (also through a link or another mount of the folder), an output folder that holds an input
    (replacing it deletes the input), and an output that names an existing file inside an input folder."""
    for out_flag, out in outputs.items():
        if out is None:
            continue
        out_path = _real_path(out)
        out_id = _identity(out_path)
        if out_id is None:  # nothing there yet: writing it replaces nothing
            continue
        out_lineage = _lineage(out_path)
        for in_flag, src in inputs.items():
            if src is None:
                continue
            src_path = _real_path(src)
            src_id = _identity(src_path)
            if src_id is None:
                continue
            if out_id in _lineage(src_path):
                raise GemmaError(f"{out}: {out_flag} would overwrite the input {in_flag} {src}; choose another path")
            if src_path.is_dir() and src_id in out_lineage:
                raise GemmaError(
                    f"{out}: {out_flag} would overwrite a file of the input {in_flag} {src}; choose another path"
                )


def check_source_file(source: str | os.PathLike | None, what: str = "model file") -> None:
    """A local source that is not a folder must be a regular file: a FIFO or a device (`/dev/zero`) given as a model
    is a one-line error instead of a read that never ends. Sources that are not local paths pass."""
    if source is None:
        return
    p = Path(source).expanduser()
    try:
        if not p.exists() or p.is_dir():
            return
    except (OSError, ValueError):
        return
    regular_file(p, what)


def describe_mode(mode: int) -> str:
    """What a file mode that is not a regular file names: 'a FIFO', 'a device', 'a socket'."""
    return (
        "a FIFO"
        if stat.S_ISFIFO(mode)
        else "a device"
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
        else "a socket"
        if stat.S_ISSOCK(mode)
        else "not a regular file"
    )


def read_json(path: str | os.PathLike, what: str = "file") -> dict[str, Any]:
    """A JSON object from a regular file, or a one-line error naming the file once: a folder, FIFO or device where
    the file belongs, text that is not UTF-8 or not JSON, and JSON nested too deeply for the parser are refused
    (`read_json_file`)."""
    data = read_json_file(path, what)
    if not isinstance(data, dict):
        raise GemmaError(f"{path}: expected a JSON object")
    return data
