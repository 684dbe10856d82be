"""--data sources and their mixture: the SOURCE[@WEIGHT|#COUNT] syntax, the seeded draw, the eval split held out
of it, and the whole path from the command line (local files in every format, a hub dataset from the HF cache, two
processes sharing one cache) with its one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gemma.errors import GemmaError
from test_hub_data import fake_dataset
from train.cache import Encoding, open_or_build, tokenizer_fingerprint
from train.mixture import draw, mix
from train.sources import parse_source

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "examples" / "arith_train.jsonl"
GENERAL = ROOT / "examples" / "general_zh_en.jsonl"


def test_source_syntax(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("{}\n")
    assert parse_source(str(data)).path == data
    assert parse_source(f"{data}@0.25").weight == 0.25
    assert parse_source(f"{data}#300").count == 300
    odd = tmp_path / "odd@2.jsonl"  # an existing path is a path, whatever it holds
    odd.write_text("{}\n")
    assert parse_source(str(odd)).path == odd and parse_source(str(odd)).weight is None
    hub = parse_source("org/name:zh:test@2")
    assert (hub.repo, hub.config, hub.split, hub.weight) == ("org/name", "zh", "test", 2.0)
    assert (parse_source("org/name::validation").config, parse_source("org/name::validation").split) == (
        None,
        "validation",
    )
    assert parse_source("org/name").path is None


@pytest.mark.parametrize(
    "spec, message",
    [
        ("org/name@abc", "the mixture weight 'abc' is not a number"),
        ("org/name@-1", "must be a positive number"),
        ("org/name@nan", "must be a positive number"),
        ("org/name#1.5", "the record count '1.5' is not a positive whole number"),
        ("org/name#0", "not a positive whole number"),
        ("missing.jsonl", "no such file or folder, and not a hub dataset id"),
        ("./org/name", "no such file or folder"),
        ("a/b/c", "no such file or folder"),
        ("", "empty"),
    ],
)
def test_bad_sources(spec, message):
    with pytest.raises(GemmaError, match=message):
        parse_source(spec)


def test_draw_takes_each_share():
    import random

    assert draw(10, 1.0, random.Random(0)).tolist() == list(range(10))
    half = draw(10, 0.5, random.Random(0))
    assert len(half) == 5 and len(set(half.tolist())) == 5
    twice = draw(10, 2.0, random.Random(0))
    assert sorted(twice.tolist()) == sorted(list(range(10)) * 2)
    more = draw(10, 1.5, random.Random(0))
    assert len(more) == 15 and set(range(10)) <= set(more.tolist())
    assert draw(7, 3 / 7, random.Random(0)).tolist() == draw(7, 3 / 7, random.Random(0)).tolist()  # seeded


@pytest.fixture(scope="module")
def stores(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    encoding = Encoding(tokenizer_fingerprint(tok), 96, False, True)
    return [open_or_build(root, str(p), [p], {}, encoding, tok, 1, lambda _: None)[0] for p in (ARITH, GENERAL)]


def test_mix_follows_the_shares_and_the_seed(stores):
    a, b = stores
    train, held = mix(stores, [0.5, 2.0], seed=3, eval_split=0.0)
    from_a = int((train.rows < len(a)).sum())
    assert from_a == round(0.5 * len(a)) and len(train) - from_a == 2 * len(b) and len(held) == 0
    again, _ = mix(stores, [0.5, 2.0], seed=3, eval_split=0.0)
    assert np.array_equal(again.rows, train.rows)
    other, _ = mix(stores, [0.5, 2.0], seed=4, eval_split=0.0)
    assert not np.array_equal(other.rows, train.rows)
    assert train[0].input_ids == a.example(int(train.rows[0])).input_ids


def test_eval_split_holds_out_every_copy(stores):
    train, held = mix(stores, [1.0, 3.0], seed=0, eval_split=0.1)
    assert len(held) == int((len(stores[0]) + len(stores[1])) * 0.1)  # of the distinct examples, not the copies
    assert not set(held.rows.tolist()) & set(train.rows.tolist())


# ---- from the command line ----


def sft(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "train.sft", *map(str, args)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
        cwd=ROOT,
        timeout=600,
    )


def records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_a_mixture_of_formats_trains(tiny_folder, tmp_path):
    """Parquet with mapped columns at half weight, plus JSONL twice over: the log counts the draw, the cache is
    built on the first run and read on the second."""
    rows = records(ARITH)
    pq.write_table(
        pa.Table.from_pylist([{"query": r["instruction"], "answer": r["output"]} for r in rows]),
        tmp_path / "arith.parquet",
    )
    cache = tmp_path / "cache"
    common = ["--model", tiny_folder, "--max-steps", 2, "--batch-size", 2, "--lora-r", 2, "--data-cache", cache]
    common += ["--data", f"{tmp_path / 'arith.parquet'}@0.5", "--columns", "instruction=query,output=answer"]
    common += ["--data", f"{GENERAL}@2", "--columns", "auto", "--eval-split", 0]
    first = sft(*common, "--out", tmp_path / "a")
    assert first.returncode == 0, first.stderr
    log = first.stdout + first.stderr
    n_general = len(records(GENERAL))
    assert f"{tmp_path / 'arith.parquet'}@0.5: {round(len(rows) / 2)}" in log
    assert f"{GENERAL}@2: {2 * n_general}" in log
    assert log.count("(from the cache)") == 0 and log.count("encoded ") == 2
    second = sft(*common, "--out", tmp_path / "b")
    assert second.returncode == 0, second.stderr
    assert (second.stdout + second.stderr).count("(from the cache)") == 2
    resolved = json.loads((tmp_path / "b" / "config.json").read_text())["resolved"]
    assert resolved["train_examples"] == round(len(rows) / 2) + 2 * n_general


def test_a_hub_dataset_from_the_local_cache(tiny_folder, tmp_path):
    hub = tmp_path / "hub"
    rows = records(ARITH)
    snap = fake_dataset(hub, "org/arith", {"README.md": "# arith\n"})
    (snap / "data").mkdir()
    pq.write_table(pa.Table.from_pylist(rows[:40]), snap / "data" / "train-00000-of-00001.parquet")
    pq.write_table(pa.Table.from_pylist(rows[40:50]), snap / "data" / "test-00000-of-00001.parquet")
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    common = ["--model", tiny_folder, "--max-steps", 1, "--batch-size", 2, "--lora-r", 2]
    run = sft(*common, "--data", "org/arith", "--eval-data", "org/arith::test", "--out", tmp_path / "a", env=env)
    assert run.returncode == 0, run.stderr
    resolved = json.loads((tmp_path / "a" / "config.json").read_text())["resolved"]
    assert (resolved["train_examples"], resolved["eval_examples"]) == (40, 10)
    missing = sft(*common, "--data", "org/arith::validation", "--out", tmp_path / "b", env=env)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1
    expected = "error: org/arith: config 'default' has no split 'validation' (splits: train, test)"
    assert missing.stderr.startswith(expected)
    absent = sft(*common, "--data", "org/absent", "--out", tmp_path / "c", env=env)
    assert absent.returncode == 2 and "org/absent: not in the local HF cache" in absent.stderr


@pytest.mark.parametrize(
    "data, columns, message",
    [
        ("bad.parquet", None, "bad.parquet: not a readable Parquet file"),
        ("{arith}@abc", None, "the mixture weight 'abc' is not a number"),
        ("good.parquet", "instruction=query,output=reply", "maps 'output' to column 'reply', which it lacks"),
        ("good.parquet", "instruction=query,output=answer,system=sys", "maps 'system' to column 'sys'"),
        ("good.parquet", None, "its columns fit no record shape (columns: query, answer)"),
    ],
)
def test_bad_data_is_one_line(tiny_folder, tmp_path, data, columns, message):
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 not really")
    pq.write_table(pa.Table.from_pylist([{"query": "a", "answer": "b"}]), tmp_path / "good.parquet")
    source = data.format(arith=ARITH) if "{" in data else tmp_path / data
    extra = ["--columns", columns] if columns else []
    run = sft("--model", tiny_folder, "--data", source, *extra, "--max-steps", 1, "--out", tmp_path / "run")
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("error: ") and message in run.stderr and run.stderr.count("\n") == 1


def test_columns_once_or_once_per_source(tiny_folder, tmp_path):
    run = sft(
        "--model", tiny_folder, "--data", ARITH, "--data", GENERAL, "--columns", "auto", "--columns", "auto",
        "--columns", "auto", "--max-steps", 1, "--out", tmp_path / "run",
    )  # fmt: skip
    assert run.returncode == 2 and "--columns" in run.stderr and run.stderr.count("\n") == 1


def test_two_processes_build_one_cache(tiny_folder, tmp_path):
    cache = tmp_path / "cache"
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            "-m",
            "train.sft",
            "--model",
            str(tiny_folder),
            "--data",
            str(ARITH),
            "--max-steps",
            "1",
            "--batch-size",
            "1",
            "--lora-r",
            "2",
            "--data-cache",
            str(cache),
            "--out",
            str(tmp_path / "run"),
        ],  # fmt: skip
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
        cwd=ROOT,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    entries = [p for p in cache.glob("*/*") if p.is_dir()]
    assert len(entries) == 1 and not list(cache.glob("*/.*.tmp"))
    assert (run.stdout + run.stderr).count("encoded ") == 1
