"""The files of a run folder besides its checkpoints: metrics.jsonl, config.json, report.json, predictions.jsonl.

Each is written so that a crash or a full disk never leaves half of it: whole files go to a temporary name and are
renamed into place, and a metrics line that fails part-way is cut off again. JSON has no NaN or Infinity (Python's
json writes them bare, which no JSON reader takes), so a non-finite number (a diverged loss, its gradient norm) is
written as null. A failed write is a GemmaError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from gemma.errors import GemmaError
from gemma.files import json_depth_ok, read_bytes, read_json_file
from gemma.writing import finite_json, write_atomically
from train.checkpoint import writing


def json_text(value, **kw) -> str:
    """JSON text of `value`, non-finite numbers written as null (metrics.jsonl, config.json and report.json)."""
    return json.dumps(finite_json(value), allow_nan=False, **kw)


def append_metrics(path: Path, record: dict) -> None:
    """Append `record` as one line (non-finite numbers as null). A write that fails part-way (a full disk) is
    undone, so the file never ends in half a line; the failure is a GemmaError naming the file."""
    data = memoryview((json_text(record) + "\n").encode("utf-8"))
    with writing(path, "metrics"), open(path, "ab", buffering=0) as f:
        start = f.seek(0, os.SEEK_END)
        try:
            while data:
                data = data[f.write(data) :]
        except OSError:
            with contextlib.suppress(OSError):
                f.truncate(start)
            raise


def _metrics_record(line: str) -> dict | None:
    """A metrics line as written by `append_metrics` (older files may hold NaN), or None."""
    if not json_depth_ok(line):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    ok = isinstance(record, dict) and isinstance(record.get("step"), int) and not isinstance(record["step"], bool)
    return record if ok else None


def truncate_metrics(path: Path, step: int) -> None:
    """Drop lines written after the checkpoint we resume from (they will be written again), and a last line cut
    short by a crash; a damaged line before the last is a GemmaError naming it."""
    if not path.exists():
        return
    lines = read_bytes(path, "metrics file").decode("utf-8", errors="replace").split("\n")
    numbered = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
    keep = []
    for n, line in numbered:
        record = _metrics_record(line)
        if record is None:
            if n == numbered[-1][0]:
                break  # the write a crash cut short
            raise GemmaError(
                f"{path}:{n}: not a metrics line (a JSON object with an integer step); repair or remove it to resume"
            )
        if record["step"] <= step:
            keep.append(line)
    write_text(path, "".join(line + "\n" for line in keep))


def read_report(path: Path) -> dict:
    """report.json of the run being resumed (the score before training is kept from the first start)."""
    report = read_json_file(path, "report")
    if not isinstance(report, dict):
        raise GemmaError(f"{path}: not a report (expected a JSON object)")
    return report


def write_text(path: Path, text: str) -> None:
    """Write `text` to a temporary name, then rename it into place (gemma.writing.write_atomically): a failed write
    leaves the old file as it was and no temporary behind, and is a GemmaError naming `path`."""
    write_atomically(path, text)


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line (text kept as is, not escaped), written whole."""
    write_text(path, "".join(json_text(row, ensure_ascii=False) + "\n" for row in rows))


def write_json(path: Path, data) -> None:
    """`data` as indented JSON, non-finite numbers as null."""
    write_text(path, json_text(data, indent=2, default=str) + "\n")
