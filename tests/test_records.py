"""Records from every --data format, and --columns: the same records whatever the file, bad files as one line."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from gemma.errors import GemmaError
from train.records import check_columns, file_columns, iter_records, map_record, parse_columns

RECORDS = [
    {"instruction": "把这句话翻译成英文", "input": "你好，世界", "output": "Hello, world"},
    {"instruction": "2+2?", "output": "4"},  # no input: a null in a columnar file, dropped when read
    {"instruction": 'say "hi",\nthen stop', "input": "", "output": "hi"},
]


def write_all(folder: Path, records: list[dict]) -> dict[str, Path]:
    """The same records as JSONL, a JSON list, Parquet, CSV, an Arrow IPC file and an Arrow stream."""
    folder.mkdir(parents=True, exist_ok=True)
    table = pa.Table.from_pylist(records)
    paths = {
        "jsonl": folder / "d.jsonl",
        "json": folder / "d.json",
        "parquet": folder / "d.parquet",
        "csv": folder / "d.csv",
        "arrow": folder / "d.arrow",
        "stream": folder / "stream" / "d.arrow",
    }
    paths["jsonl"].write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    paths["json"].write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    pq.write_table(table, paths["parquet"], row_group_size=2)
    pcsv.write_csv(table, paths["csv"])
    with pa.ipc.new_file(paths["arrow"], table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    paths["stream"].parent.mkdir()
    with pa.ipc.new_stream(paths["stream"], table.schema) as writer:
        writer.write_table(table, max_chunksize=2)
    return paths


def test_every_format_gives_the_same_records(tmp_path):
    paths = write_all(tmp_path, RECORDS)
    for kind, path in paths.items():
        got = [record for _, record in iter_records(path)]
        if kind == "csv":  # a CSV has no nulls: the missing input is an empty cell
            got = [{k: v for k, v in r.items() if v != "" or k != "input"} for r in got]
            expected = [{k: v for k, v in r.items() if v != "" or k != "input"} for r in RECORDS]
        else:
            expected = RECORDS
        assert got == expected, kind


def test_where_names_the_line_or_row(tmp_path):
    paths = write_all(tmp_path, RECORDS)
    assert [w for w, _ in iter_records(paths["jsonl"])][-1] == f"{paths['jsonl']}:3"
    assert [w for w, _ in iter_records(paths["parquet"])] == [f"{paths['parquet']}: row {i}" for i in (1, 2, 3)]


def test_nested_nulls_are_dropped(tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
        {"messages": [{"role": "user", "content": "c", "name": "x"}, {"role": "assistant", "content": "d"}]},
    ]
    path = tmp_path / "m.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    assert [r for _, r in iter_records(path)] == rows  # not a "name": None in the first row's messages


def test_csv_cells_stay_text(tmp_path):
    path = tmp_path / "n.csv"
    path.write_text("instruction,output\n2+2?,4\n1/2?,0.50\n")
    assert [r["output"] for _, r in iter_records(path)] == ["4", "0.50"]


@pytest.mark.parametrize("suffix, what", [(".parquet", "Parquet"), (".arrow", "Arrow"), (".csv", "CSV")])
def test_unreadable_columnar_file_is_one_line(tmp_path, suffix, what):
    path = tmp_path / f"bad{suffix}"
    path.write_bytes(b"PAR1\x00\x01garbage" if suffix != ".csv" else b'a,b\n"x,1\n')
    with pytest.raises(GemmaError) as caught:
        list(iter_records(path))
    message = str(caught.value)
    assert message.startswith(f"{path}: ") and what in message and "\n" not in message


def test_empty_parquet_is_refused(tmp_path):
    path = tmp_path / "e.parquet"
    pq.write_table(pa.table({"instruction": pa.array([], pa.string()), "output": pa.array([], pa.string())}), path)
    with pytest.raises(GemmaError, match="empty data set"):
        list(iter_records(path))


def test_column_map(tmp_path):
    mapping = parse_columns("instruction=query, output=answer")
    assert mapping == {"instruction": "query", "output": "answer"}
    assert parse_columns("auto") == {}
    record = {"query": "q", "answer": "a", "id": 7}
    assert map_record(record, mapping, "x") == {"instruction": "q", "output": "a", "id": 7}
    path = tmp_path / "c.parquet"
    pq.write_table(pa.Table.from_pylist([record]), path)
    assert file_columns(path) == ["query", "answer", "id"]
    check_columns(str(path), file_columns(path), mapping)


@pytest.mark.parametrize(
    "text, message",
    [
        ("instruction", "expected FIELD=COLUMN pairs"),
        ("instrucshun=q", "unknown field 'instrucshun'"),
        ("output=a,output=b", "field 'output' mapped twice"),
    ],
)
def test_bad_column_maps(text, message):
    with pytest.raises(GemmaError, match=message):
        parse_columns(text)


def test_columns_that_fit_nothing_name_what_there_is():
    with pytest.raises(GemmaError, match=r"maps 'output' to column 'reply', which it lacks \(columns: query, answer\)"):
        check_columns("f.parquet", ["query", "answer"], {"output": "reply"})
    with pytest.raises(GemmaError, match=r"fit no record shape \(columns: query, reply\)"):
        check_columns("f.parquet", ["query", "reply"], {})
    check_columns("f.parquet", ["prompt", "response"], {})  # a pair read as instruction/output
    check_columns("f.parquet", ["question", "answer"], {})
