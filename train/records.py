"""Records from data files of every format --data takes, with column names mapped to the shapes train.data reads.

`iter_records(path)` yields (where, record) pairs, `where` saying where the record is for error messages:
- JSONL: streamed line by line ("FILE:LINE"), so a file of millions of records is never in memory at once;
- a JSON list: parsed whole (train.data's reader, "FILE:LINE" of each record);
- Parquet, Arrow (IPC file or stream, as `datasets` writes its cache) and CSV through pyarrow, a record batch at a
  time ("FILE: row N", counting from 1).

pyarrow rather than `datasets`: it is the columnar library `datasets` itself is built on, reads each of these formats
as a stream of batches with no cache of its own, and brings none of `datasets`' other dependencies (pandas, fsspec,
multiprocess); huggingface-hub already finds and downloads hub datasets' files (train.hub_data).

A record read from a columnar file has its nulls dropped at every depth: Arrow gives a struct every key that any row
has, so a message without `tool_calls` comes back with `tool_calls: None`, which is not what the row said.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from gemma.errors import GemmaError
from gemma.files import MAX_JSON_DEPTH, has_lone_surrogate, json_depth_ok, regular_file
from train.data import _SURROGATE_ESCAPE, _is_one_object, _json_kind, _read_located

DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".csv", ".arrow")
COLUMNAR = (".parquet", ".csv", ".arrow")
BATCH_ROWS = 1024  # rows converted to Python at a time from a columnar file
# The fields --columns may map a column to: those of the shapes train.data.record_messages and train.data_gemma4 read.
FIELDS = ("instruction", "input", "output", "system", "prompt", "response", "question", "answer")
FIELDS += ("conversations", "messages", "tools")


def iter_records(path) -> Iterator[tuple[str, dict]]:
    """(where, record) for every record of one data file, in file order; the format follows the file name's
    suffix (anything not columnar is JSON or JSONL, told apart by its first character)."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet(path)
    elif suffix == ".arrow":
        yield from _arrow(path)
    elif suffix == ".csv":
        yield from _csv(path)
    else:
        yield from _json(path)


def file_columns(path) -> list[str] | None:
    """The column names of a columnar file (from its schema, without reading its rows); None for JSON."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return list(_open_parquet(path).schema_arrow.names)
    if suffix == ".arrow":
        return list(_open_arrow(path).schema.names)
    if suffix == ".csv":
        return _csv_header(path)
    return None


# ---- JSON and JSONL ----


def _json(path: Path) -> Iterator[tuple[str, dict]]:
    regular_file(path, "data file")
    with _reading(path, "data file"):
        with open(path, "rb") as f:
            head = f.read(4096).decode("utf-8-sig", errors="replace").lstrip(" \t\r\n")
    if head.startswith("["):
        yield from _read_located(path)
        return
    count = 0
    with _reading(path, "data file"), open(path, "rb") as f:
        for n, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8-sig" if n == 1 else "utf-8")
            except UnicodeDecodeError:
                raise GemmaError(f"{path}:{n}: not UTF-8 text") from None
            if not line.strip():
                continue
            record = _json_line(path, n, line, first=count == 0)
            count += 1
            yield f"{path}:{n}", record
    if not count:
        raise GemmaError(f"{path}: empty data set")


def _json_line(path: Path, n: int, line: str, first: bool) -> dict:
    if not json_depth_ok(line):
        raise GemmaError(f"{path}:{n}: JSON nested deeper than {MAX_JSON_DEPTH} levels")
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        if first and _whole_file_is_one_object(path):
            raise GemmaError(
                f"{path}: holds a single JSON object; expected a JSON list of records or one record per line (JSONL)"
            ) from None
        raise GemmaError(f"{path}:{n}: malformed JSON line ({e.msg}, column {e.colno})") from None
    if not isinstance(record, dict):
        raise GemmaError(f"{path}:{n}: expected a record (a JSON object), got {_json_kind(record)}")
    if _SURROGATE_ESCAPE.search(line) and has_lone_surrogate(json.dumps(record, ensure_ascii=False)):
        raise GemmaError(
            f"{path}:{n}: holds a lone UTF-16 surrogate (an escape \\ud800 to \\udfff that is not half of a pair), "
            "which is not text"
        )
    return record


def _whole_file_is_one_object(path: Path, limit: int = 64 << 20) -> bool:
    """Whether the file is one JSON object spread over lines (only asked when its first line does not parse)."""
    if os.path.getsize(path) > limit:
        return False
    try:
        return _is_one_object(path.read_bytes().decode("utf-8-sig"))
    except (OSError, UnicodeDecodeError):
        return False


# ---- columnar files (pyarrow) ----


class _reading:
    """Turns what a reader raises on a bad file into one line naming it (pyarrow's own first line as the reason)."""

    def __init__(self, path: Path, what: str):
        self.path, self.what = path, what

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, GemmaError | GeneratorExit):
            return False
        import pyarrow as pa

        if isinstance(exc, OSError) and not isinstance(exc, pa.ArrowException):
            raise GemmaError(f"{self.path}: cannot read the {self.what} ({exc.strerror or exc})") from None
        if isinstance(exc, pa.ArrowException | ValueError):
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise GemmaError(f"{self.path}: not a readable {self.what} ({reason})") from None
        return False


def _open_parquet(path: Path):
    import pyarrow.parquet as pq

    regular_file(path, "Parquet file")
    with _reading(path, "Parquet file"):
        return pq.ParquetFile(path, memory_map=True)


def _parquet(path: Path) -> Iterator[tuple[str, dict]]:
    parquet = _open_parquet(path)
    with _reading(path, "Parquet file"):
        yield from _rows(path, parquet.iter_batches(batch_size=BATCH_ROWS))


def _open_arrow(path: Path):
    """An Arrow IPC reader: the file format (random access), else the stream format that `datasets` caches in."""
    import pyarrow as pa

    regular_file(path, "Arrow file")
    with _reading(path, "Arrow file"):
        source = pa.memory_map(str(path))
        try:
            return pa.ipc.open_file(source)
        except pa.ArrowInvalid:
            source.seek(0)
            return pa.ipc.open_stream(source)


def _arrow(path: Path) -> Iterator[tuple[str, dict]]:
    reader = _open_arrow(path)
    with _reading(path, "Arrow file"):
        if hasattr(reader, "num_record_batches"):
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = iter(reader)
        yield from _rows(path, batches)


def _csv_header(path: Path) -> list[str]:
    import pyarrow.csv as pcsv

    regular_file(path, "CSV file")
    with _reading(path, "CSV file"):
        return list(pcsv.open_csv(path, parse_options=pcsv.ParseOptions(newlines_in_values=True)).schema.names)


def _csv(path: Path) -> Iterator[tuple[str, dict]]:
    """Every column read as text (a CSV has no types; an answer "42" stays the string "42"), empty cells as ""."""
    import pyarrow as pa
    import pyarrow.csv as pcsv

    names = _csv_header(path)
    convert = pcsv.ConvertOptions(column_types={n: pa.string() for n in names}, strings_can_be_null=False)
    read = pcsv.ReadOptions(block_size=1 << 22)
    with _reading(path, "CSV file"):
        reader = pcsv.open_csv(
            path, read_options=read, parse_options=pcsv.ParseOptions(newlines_in_values=True), convert_options=convert
        )
        yield from _rows(path, reader)


def _rows(path: Path, batches) -> Iterator[tuple[str, dict]]:
    row = 0
    for batch in batches:
        for record in batch.to_pylist():
            row += 1
            yield f"{path}: row {row}", _without_nulls(record)
    if not row:
        raise GemmaError(f"{path}: empty data set")


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


# ---- column mapping ----


def parse_columns(text: str) -> dict[str, str]:
    """`--columns instruction=query,output=answer` as {field: column}; "auto" (or "") maps nothing."""
    if text.strip() in ("", "auto"):
        return {}
    mapping: dict[str, str] = {}
    for part in text.split(","):
        field, eq, column = (s.strip() for s in part.partition("="))
        if not eq or not field or not column:
            raise GemmaError(f"--columns {text}: expected FIELD=COLUMN pairs separated by commas, got {part.strip()!r}")
        if field not in FIELDS:
            raise GemmaError(f"--columns {text}: unknown field {field!r} (fields: {', '.join(FIELDS)})")
        if field in mapping:
            raise GemmaError(f"--columns {text}: field {field!r} mapped twice")
        mapping[field] = column
    return mapping


def check_columns(where: str, columns: list[str], mapping: Mapping[str, str]) -> None:
    """A column map naming a column that the source lacks, or a source whose columns fit no record shape: one line
    naming the columns it has."""
    have = ", ".join(columns) or "none"
    for field, column in mapping.items():
        if column not in columns:
            raise GemmaError(
                f"{where}: --columns maps {field!r} to column {column!r}, which it lacks (columns: {have})"
            )
    names = set(map_record(dict.fromkeys(columns, ""), mapping, where))
    from train.data import QA_PAIRS

    shapes = [{"messages"}, {"conversations"}, {"instruction", "output"}] + [set(pair) for pair in QA_PAIRS]
    if not any(shape <= names for shape in shapes):
        raise GemmaError(
            f"{where}: its columns fit no record shape (columns: {have}); expected instruction/output, "
            "prompt/response, question/answer, conversations or messages, or name them with --columns FIELD=COLUMN"
        )


def map_record(record: dict, mapping: Mapping[str, str], where: str) -> dict:
    """`record` with its mapped columns renamed to their fields; a mapped column the record lacks is an error."""
    if not mapping:
        return record
    missing = [c for c in mapping.values() if c not in record]
    if missing:
        raise GemmaError(f"{where}: has no column {missing[0]!r}, which --columns maps")
    moved = set(mapping.values())
    out = {k: v for k, v in record.items() if k not in moved}
    out.update((field, record[column]) for field, column in mapping.items())
    return out
