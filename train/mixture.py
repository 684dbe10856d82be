"""The training set as the loop sees it: the cached sources mixed by their shares, an eval split held out, packing.

Nothing here copies tokens: a set is an index (int64 rows into the sources' memory-mapped entries, or for packed
sequences the rows of each), and an example is built from the maps when a batch asks for it. So memory holds the
index and the current batch, whatever the size of the corpus.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np

from train.cache import TokenStore
from train.data import Example, join_examples, pack_plan


class Examples(Sequence):
    """Examples chosen by `rows` from `stores` (row r is example r - start of the store that holds it)."""

    def __init__(self, stores: list[TokenStore], rows: np.ndarray):
        self.stores = stores
        self.starts = np.cumsum([0] + [len(s) for s in stores])
        self.rows = np.asarray(rows, dtype=np.int64)
        every = np.concatenate([s.lengths for s in stores]) if stores else np.zeros(0, dtype=np.int64)
        self._lengths = every[self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> Example:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        row = int(self.rows[i])
        s = int(np.searchsorted(self.starts, row, side="right")) - 1
        return self.stores[s].example(row - int(self.starts[s]))

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths


class Packed(Sequence):
    """Sequences of several examples of `base` each (train.data.pack_plan's bins)."""

    def __init__(self, base: Examples, bins: list[list[int]]):
        self.base, self.bins = base, bins
        lengths = base._lengths
        self._lengths = np.array([int(lengths[members].sum()) for members in bins], dtype=np.int64)

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, i: int) -> Example:
        return join_examples([self.base[j] for j in self.bins[i]])

    @property
    def lengths(self) -> np.ndarray:
        return self._lengths


def packed(base: Examples, max_len: int) -> Packed:
    return Packed(base, pack_plan(base._lengths.tolist(), max_len))


def draw(n: int, share: float, rng: random.Random) -> np.ndarray:
    """Rows 0..n-1 drawn `share` x n times (rounded): each whole times, then a sample without repeats for the rest."""
    total = max(1, round(share * n))
    whole, part = divmod(total, n)
    rows = np.tile(np.arange(n, dtype=np.int64), whole)
    if part:
        rows = np.concatenate([rows, np.sort(np.array(rng.sample(range(n), part), dtype=np.int64))])
    return np.sort(rows, kind="stable")


def mix(stores: list[TokenStore], shares: list[float], seed: int, eval_split: float) -> tuple[Examples, Examples]:
    """(train, eval): each store drawn at its share (a fixed draw for the seed), then `eval_split` of the distinct
    examples drawn held out (at least one), with every copy of them: no example is in both."""
    starts = np.cumsum([0] + [len(s) for s in stores])
    rows = [
        draw(len(s), share, random.Random(f"mix:{seed}:{i}")) + starts[i]
        for i, (s, share) in enumerate(zip(stores, shares))
    ]
    train = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64)
    held = np.zeros(0, dtype=np.int64)
    if eval_split > 0:
        distinct = np.unique(train)
        held = np.sort(split_rows(len(distinct), eval_split, seed, distinct))
        train = train[~np.isin(train, held)]
    return Examples(stores, train), Examples(stores, held)


def split_rows(n: int, fraction: float, seed: int, rows: np.ndarray) -> np.ndarray:
    """A seeded `fraction` of `rows` (at least one): the --eval-split share, the same for every rank."""
    import torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).numpy()
    return rows[order[: max(1, int(n * fraction))]]
