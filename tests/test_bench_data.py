"""tools/bench_data.py: the synthetic set is seeded and alpaca-shaped, and the command measures a first start per
process count and a second start from the cache, end to end on the tiny model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import bench_data

ROOT = Path(__file__).resolve().parent.parent


def test_the_generated_set_is_seeded_and_alpaca_shaped(tmp_path):
    a = bench_data.generate(tmp_path / "a.jsonl", 200, seed=3).read_text()
    b = bench_data.generate(tmp_path / "b.jsonl", 200, seed=3).read_text()
    assert a == b and a != bench_data.generate(tmp_path / "c.jsonl", 200, seed=4).read_text()
    records = [json.loads(line) for line in a.splitlines()]
    assert len(records) == 200 and all(set(r) == {"instruction", "input", "output"} and r["output"] for r in records)
    assert any(r["input"] for r in records) and any(not r["input"] for r in records)
    assert any("\u4e00" <= ch <= "\u9fff" for r in records for ch in r["instruction"])  # Chinese among them


def test_the_command_measures_first_and_second_starts(tiny_folder, tmp_path):
    out = tmp_path / "figures.json"
    run = subprocess.run(
        [sys.executable, "tools/bench_data.py", "--records", "300", "--small", "100", "--num-proc", "1,2"]
        + ["--model", str(tiny_folder), "--work", str(tmp_path / "work"), "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    rows = json.loads(out.read_text())
    assert [(r["records"], r["start"], r["num_proc"]) for r in rows] == [
        (300, "first", 1),
        (300, "first", 2),
        (300, "second", 1),
        (100, "first", 1),
        (100, "second", 1),
    ]
    for r in rows:
        assert r["startup_s"] > 0 and r["wall_s"] >= r["startup_s"] and r["peak_rss_mb"] > 0
        # A first start encodes every record (with the processes asked for); a second reads the cache.
        if r["start"] == "first":
            assert r["encoded"] == r["records"] and r["processes"] == r["num_proc"] and r["records_per_s"] > 0
        else:
            assert "records_per_s" not in r
    assert "records/s" in run.stdout and "peak RSS" in run.stdout
