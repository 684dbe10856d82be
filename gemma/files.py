"""Reading a user's files safely, and keeping outputs off inputs.

Every file a command reads (data, configs, checkpoints, tokenizers, adapters) goes through `regular_file` first:
a folder, a FIFO or a device (`/dev/zero`) named where a file belongs is a one-line error, not a hang or a read
that never ends. `refuse_overwriting_inputs` is called by every tool before it loads anything, so that no output
path can replace one of the command's own inputs.
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
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) \
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file"
        raise GemmaError(f"{p}: is {kind}, not a {what}")
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


def _same_or_inside(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def refuse_overwriting_inputs(outputs: dict[str, str | os.PathLike | None],
                              inputs: dict[str, str | os.PathLike | None]) -> None:
    """A GemmaError if writing any output could replace or delete one of the inputs.

    `outputs` and `inputs` map a flag (as the user typed it, e.g. "--out") to a path; None entries are skipped, and
    an input that is not a local path (a repo id, a preset) never matches. Refused: an output that is the same file
    as an input (also through a link), an output folder that holds an input (replacing it deletes the input), and an
    output that names an existing file inside an input folder."""
    for out_flag, out in outputs.items():
        if out is None:
            continue
        out_path = Path(out).expanduser().resolve()
        for in_flag, src in inputs.items():
            if src is None or not Path(src).expanduser().exists():
                continue
            src_path = Path(src).expanduser().resolve()
            same = out_path.exists() and os.path.samefile(out_path, src_path)
            if same or _same_or_inside(src_path, out_path):
                raise GemmaError(f"{out}: {out_flag} would overwrite the input {in_flag} {src}; choose another path")
            if src_path.is_dir() and out_path.exists() and _same_or_inside(out_path, src_path):
                raise GemmaError(f"{out}: {out_flag} would overwrite a file of the input {in_flag} {src}; "
                                 "choose another path")
