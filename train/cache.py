"""The tokenize-once cache: each data source encoded once into memory-mapped token arrays on disk.

A source's entry is a folder named by a SHA-256 key over everything that changes its tokens: the content of its
data files (in order), the column map, the tokenizer's own files and chat format, max_len, train_on_prompt,
train_on_thoughts and CACHE_VERSION (raised whenever the encoding code changes what it writes). Any change is a new
key, so an entry is never stale; one that is not needed any more is only disk space (the folder can be deleted at
any time between runs).

An entry holds three flat arrays and a description:
- ids.i32: the input ids of every example, one after another (int32: Gemma's vocabularies pass 65535);
- loss.u8: per token, whether its target (the next token) takes loss: train.data.Example's targets are
  `ids[t + 1] if loss[t] else IGNORE`, and the last target of each example is IGNORE;
- offsets.i64: where each example starts, plus the end;
- meta.json: the key's inputs, the DataStats of the encoding, its time.
It is written into a temporary folder beside its place and renamed there whole, so a killed build leaves no entry
behind, and two processes that build the same entry at once (two nodes, two jobs) both end with one good copy.

Encoding runs in `num_proc` processes: this one reads the records and writes the arrays, the workers (forked, so
the tokenizer needs no pickling) encode batches of records, at most two batches each in flight, so memory holds a
few batches, never the corpus.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import shutil
import sys
import time
from array import array
from collections import deque
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from gemma.errors import GemmaError
from gemma.files import regular_file
from train.data import IGNORE, DataStats, Example, count_example, encode_record
from train.records import iter_records, map_record

CACHE_VERSION = 1
BATCH_RECORDS = 256  # records a worker encodes per task
_FILES = ("ids.i32", "loss.u8", "offsets.i64", "meta.json")


def default_root() -> Path:
    """$GEMMA_SFT_CACHE, else $XDG_CACHE_HOME/gemma-sft/data, else ~/.cache/gemma-sft/data."""
    if os.environ.get("GEMMA_SFT_CACHE"):
        return Path(os.environ["GEMMA_SFT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gemma-sft" / "data"


@dataclass(frozen=True)
class Encoding:
    """How records become examples: everything besides the data that changes the tokens."""

    tokenizer: str  # the tokenizer's fingerprint (tokenizer_fingerprint)
    max_len: int
    train_on_prompt: bool
    train_on_thoughts: bool


def tokenizer_fingerprint(tokenizer) -> str:
    """SHA-256 over the tokenizer's files and chat format: two tokenizers that encode alike share it."""
    h = hashlib.sha256(f"chat_format={tokenizer.chat_format}".encode())
    for name, data in sorted(tokenizer.files.items()):
        h.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read 8 MiB at a time."""
    h = hashlib.sha256()
    regular_file(path, "data file")  # a FIFO or a device would block or never end
    try:
        with open(path, "rb") as f:
            while chunk := f.read(8 << 20):
                h.update(chunk)
    except OSError as exc:
        raise GemmaError(f"{path}: cannot read the data file ({exc.strerror or exc})") from None
    return h.hexdigest()


def entry_key(files: list[Path], columns: dict[str, str], encoding: Encoding) -> tuple[str, dict]:
    """(key, the inputs it was made from)."""
    inputs = {
        "version": CACHE_VERSION,
        "files": [file_digest(p) for p in files],
        "columns": columns,
        **asdict(encoding),
    }
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest(), inputs


class TokenStore:
    """One cache entry, memory-mapped: its examples built on demand."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.meta = json.loads((folder / "meta.json").read_text())
        self.offsets = np.fromfile(folder / "offsets.i64", dtype=np.int64)
        self.ids = _mapped(folder / "ids.i32", np.int32)
        self.loss = _mapped(folder / "loss.u8", np.uint8)
        if len(self.ids) != self.offsets[-1] or len(self.loss) != len(self.ids):
            raise GemmaError(f"{folder}: a damaged data cache entry (its arrays disagree); delete the folder")

    @property
    def stats(self) -> DataStats:
        return DataStats(**self.meta["stats"])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def example(self, i: int) -> Example:
        start, stop = int(self.offsets[i]), int(self.offsets[i + 1])
        ids = self.ids[start:stop]
        targets = np.full(stop - start, IGNORE, dtype=np.int64)
        targets[:-1] = np.where(self.loss[start : stop - 1] != 0, ids[1:], IGNORE)
        return Example(ids.tolist(), targets.tolist())


def _mapped(path: Path, dtype) -> np.ndarray:
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def open_or_build(
    root: Path, name: str, files: list[Path], columns: dict, encoding: Encoding, tokenizer, num_proc: int, log
) -> tuple[TokenStore, bool]:
    """(the entry of this source, whether it was built now): read from the cache when there, else encoded into it."""
    key, inputs = entry_key(files, columns, encoding)
    folder = root / key[:2] / key
    if all((folder / f).is_file() for f in _FILES):
        return TokenStore(folder), False
    build(folder, name, files, columns, inputs, encoding, tokenizer, num_proc, log)
    return TokenStore(folder), True


def build(folder: Path, name: str, files, columns, inputs: dict, encoding: Encoding, tokenizer, num_proc, log):
    """Encode every record of `files` into a new entry at `folder`."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        work = Path(folder.parent / f".{folder.name}.{os.getpid()}.tmp")
        if work.exists():
            shutil.rmtree(work)
        work.mkdir()
    except OSError as exc:
        raise GemmaError(
            f"{folder.parent}: cannot write the data cache ({exc.strerror or exc}); choose another with --data-cache"
        ) from None
    try:
        stats, seconds, used = _encode_into(work, name, files, columns, encoding, tokenizer, num_proc)
        if not stats.examples:
            raise GemmaError(f"{name}: no example to train on with max_len {encoding.max_len} ({stats.summary()})")
        meta = {"inputs": inputs, "source": name, "stats": asdict(stats), "seconds": seconds, "processes": used}
        (work / "meta.json").write_text(json.dumps(meta, indent=1))
        try:
            os.rename(work, folder)
        except OSError:
            if not all((folder / f).is_file() for f in _FILES):  # not another process's finished copy: a real fault
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    rate = stats.records / max(seconds, 1e-9)
    log(
        f"encoded {name}: {stats.records} records in {seconds:.1f} s with {used} process{'es' * (used > 1)} "
        f"({rate:,.0f} records/s, {stats.tokens / max(seconds, 1e-9):,.0f} tokens/s) into {folder}"
    )


# ---- encoding ----

_JOB: dict = {}  # what a forked worker encodes with: set in the parent before the fork


def _encode_batch(batch: list[tuple[str, dict]]):
    """(ids, loss flags, lengths, stats) of a batch of records, as arrays."""
    tokenizer, encoding, columns = _JOB["tokenizer"], _JOB["encoding"], _JOB["columns"]
    stats = DataStats()
    ids, loss, lengths = [], [], []
    for where, record in batch:
        record = map_record(record, columns, where)
        example, note = encode_record(
            record, where, tokenizer, encoding.max_len, encoding.train_on_prompt, encoding.train_on_thoughts
        )
        count_example(stats, example, note)
        if example is not None:
            ids += example.input_ids
            loss += [t != IGNORE for t in example.targets]
            lengths.append(len(example.input_ids))
    return np.array(ids, dtype=np.int32), np.array(loss, dtype=np.uint8), lengths, stats


def _batches(files):
    batch = []
    for path in files:
        for located in iter_records(path):
            batch.append(located)
            if len(batch) == BATCH_RECORDS:
                yield batch
                batch = []
    if batch:
        yield batch


def _encode_into(work: Path, name: str, files, columns, encoding: Encoding, tokenizer, num_proc: int):
    from tqdm import tqdm

    _JOB.update(tokenizer=tokenizer, encoding=encoding, columns=columns)
    stats, offsets = DataStats(), array("q", [0])  # 8 bytes an example, not a Python int's 36
    start = time.perf_counter()
    can_fork = "fork" in multiprocessing.get_all_start_methods()
    used = num_proc if can_fork else 1
    # Shown only for a source that takes more than two seconds; closed before any error line, which starts its own.
    bar = tqdm(desc=f"encode {name}", unit=" records", dynamic_ncols=True, file=sys.stderr, mininterval=1, delay=2)
    with bar, open(work / "ids.i32", "wb") as ids_file, open(work / "loss.u8", "wb") as loss_file:
        for ids, loss, lengths, part in _encoded(_batches(files), used):
            ids.tofile(ids_file)
            loss.tofile(loss_file)
            for n in lengths:
                offsets.append(offsets[-1] + n)
            for field in asdict(part):
                setattr(stats, field, getattr(stats, field) + getattr(part, field))
            bar.update(part.records)
    np.frombuffer(offsets, dtype=np.int64).tofile(work / "offsets.i64")
    _JOB.clear()
    return stats, time.perf_counter() - start, used


def _encoded(batches, processes: int):
    """The encoded batches in order: in this process, or in a pool of forked workers with a bounded queue."""
    if processes <= 1:
        yield from map(_encode_batch, batches)
        return
    pool = multiprocessing.get_context("fork").Pool(processes)
    try:
        pending: deque = deque()
        for batch in batches:
            pending.append(pool.apply_async(_encode_batch, (batch,)))
            if len(pending) >= 2 * processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()
