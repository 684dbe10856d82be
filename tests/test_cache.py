"""The tokenize-once cache: the examples train.data encodes, stored once, reused while nothing that changes them
changes, rebuilt when something does; worker processes give the same arrays as one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from gemma.errors import GemmaError
from test_records import RECORDS, write_all
from train.cache import Encoding, open_or_build, tokenizer_fingerprint
from train.data import load_dataset

ROOT = Path(__file__).resolve().parents[1]
GENERAL = ROOT / "examples" / "general_zh_en.jsonl"


def quiet(_):
    pass


def encoding_of(tok, max_len=96, train_on_prompt=False):
    return Encoding(tokenizer_fingerprint(tok), max_len, train_on_prompt, True)


def entry(root, files, tok, columns=None, num_proc=1, **kw):
    return open_or_build(root, "src", list(files), columns or {}, encoding_of(tok, **kw), tok, num_proc, quiet)


def examples_of(store):
    return [store.example(i) for i in range(len(store))]


def test_store_holds_what_load_dataset_encodes(tok, tmp_path):
    store, built = entry(tmp_path, [GENERAL], tok)
    assert built
    expected, stats = load_dataset(GENERAL, tok, 96)
    got = examples_of(store)
    assert [e.input_ids for e in got] == [e.input_ids for e in expected]
    assert [e.targets for e in got] == [e.targets for e in expected]
    assert store.stats == stats
    assert store.ids.dtype == np.int32 and store.loss.dtype == np.uint8


def test_every_format_gives_the_same_tokens(tok, tmp_path):
    paths = write_all(tmp_path / "data", [{**r, "input": r.get("input") or "x"} for r in RECORDS])
    arrays = {}
    for kind, path in paths.items():
        store, _ = entry(tmp_path / "cache", [path], tok)
        arrays[kind] = (store.ids.tolist(), store.loss.tolist(), store.offsets.tolist())
    assert all(a == arrays["jsonl"] for a in arrays.values()), [k for k, a in arrays.items() if a != arrays["jsonl"]]


def test_worker_processes_give_the_same_arrays(tok, tmp_path, monkeypatch):
    import train.cache

    monkeypatch.setattr(train.cache, "BATCH_RECORDS", 3)  # many batches, so the workers interleave
    one, _ = entry(tmp_path / "a", [GENERAL], tok, num_proc=1)
    two, _ = entry(tmp_path / "b", [GENERAL], tok, num_proc=2)
    assert np.array_equal(one.ids, two.ids) and np.array_equal(one.loss, two.loss)
    assert np.array_equal(one.offsets, two.offsets) and one.stats == two.stats
    assert json.loads((two.folder / "meta.json").read_text())["processes"] == 2


def test_reused_until_something_that_changes_the_tokens_changes(tok, tmp_path):
    data = tmp_path / "d.jsonl"
    rows = [{"instruction": f"q{i}", "output": f"a{i}", "answer": f"other {i}"} for i in range(5)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cache = tmp_path / "cache"
    first, built = entry(cache, [data], tok)
    assert built
    again, built = entry(cache, [data], tok)
    assert not built and again.folder == first.folder
    seen = {first.folder}

    class Retrained(type(tok)):  # the same tokenizer with other file bytes: a vocabulary that may encode otherwise
        @property
        def files(self):
            return {name: data + b"\0" for name, data in super().files.items()}

    other_tok = Retrained.__new__(Retrained)
    other_tok.__dict__.update(tok.__dict__)
    for change in ({"max_len": 64}, {"train_on_prompt": True}, {"columns": {"output": "answer"}}, {"tok": other_tok}):
        store, built = entry(cache, [data], change.pop("tok", tok), **change)
        assert built and store.folder not in seen, change
        seen.add(store.folder)
    with_answer, _ = entry(cache, [data], tok, columns={"output": "answer"})
    assert with_answer.ids.tolist() != first.ids.tolist()
    data.write_text(data.read_text() + json.dumps({"instruction": "one more", "output": "record"}) + "\n")
    store, built = entry(cache, [data], tok)
    assert built and store.folder not in seen and len(store) == len(first) + 1


def test_a_failed_build_leaves_no_entry(tok, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text(GENERAL.read_text() + '{"instruction": \n')
    cache = tmp_path / "cache"
    with pytest.raises(GemmaError, match=r"d.jsonl:\d+"):
        entry(cache, [data], tok, num_proc=2)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_unwritable_cache_is_one_line(tok, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(GemmaError, match="cannot write the data cache .*--data-cache"):
        entry(blocker / "cache", [GENERAL], tok)
