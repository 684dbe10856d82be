"""A KV cache whose rows come and go: the shared cache of gemma.generation.engine, whose requests join and leave the
batch at different times.

A subclass of the model's KVCache, so that the model takes it as any cache; its row operations live here, beside
the engine, their one user, rather than in the model core, which never needs them.

Every row's tokens sit in consecutive columns ending at the shared cursor (`length`), at column offset + p for the
token at position p. Sliding layers then stay correct: the slot a new column overwrites holds the token that just
left the window. These methods keep that layout while rows are emptied, filled or moved. The cache's `max_len`
counts columns, which may be more than the model's context (the engine's cache spans twice it).
"""

from __future__ import annotations

import copy

from gemma.model.kv_cache import KVCache


class RowCache(KVCache):
    def reset_row(self, row: int) -> None:
        """Forget everything row `row` holds; the other rows are untouched."""
        for table in self.slot_pos.values():
            table[row] = -1

    def load_row(self, row: int, src: KVCache, src_row: int, offset: int) -> None:
        """Replace row `row` with what row `src_row` of `src` holds (e.g. a prompt prefilled in a cache of its own),
        placed so that the token at position p sits at column `offset` + p.

        The tokens must end before the cursor: offset + (last position) < length. A sliding layer keeps the latest
        window of them, as if they had been fed here.
        """
        if src.layer_kinds != self.layer_kinds:
            raise ValueError("caches of different models")
        self.reset_row(row)
        for s in self.kinds:
            size, pos = self.sizes[s], src.slot_pos[s][src_row]  # (S_src,)
            keep = pos >= 0
            if not keep.any():
                continue
            keep &= pos > pos.max() - size  # what this buffer can hold: the latest `size` positions
            src_slots = keep.nonzero().squeeze(1)
            p = pos[src_slots]
            cols = offset + p
            if int(cols.min()) < 0 or int(cols.max()) >= self.length:
                raise ValueError(
                    f"positions {int(p.min())}..{int(p.max())} at offset {offset} do not fit before "
                    f"the cursor ({self.length})"
                )
            dst = cols % size
            self.slot_pos[s][row, dst] = p
            for layer, kind in enumerate(self.layer_kinds):
                if kind == s:
                    self.k[layer][row][:, dst] = src.k[layer][src_row][:, src_slots]  # (KV, n, hd)
                    self.v[layer][row][:, dst] = src.v[layer][src_row][:, src_slots]

    def shift(self, d: int) -> None:
        """Move every row's tokens d columns to the left (to the right for d < 0), and the cursor with them.

        Only the columns in use are moved in the full-length buffers; ring buffers are rotated, so that each token's
        slot stays its column modulo the ring's size. Columns moved out must be empty.
        """
        if d == 0:
            return
        if not 0 <= self.length - d <= self.max_len:
            raise ValueError(f"cannot shift the cursor from {self.length} by {-d}")
        for s in self.kinds:
            size, table = self.sizes[s], self.slot_pos[s]
            layers = [i for i, kind in enumerate(self.layer_kinds) if kind == s]
            if size == self.max_len:  # slot = column
                n = self.length  # columns in use: [0, length)
                if d > 0:
                    if (table[:, :d] >= 0).any():
                        raise ValueError(f"shifting by {d} would drop cached tokens")
                    src, dst, vacated = slice(d, n), slice(0, n - d), slice(n - d, n)
                else:
                    src, dst, vacated = slice(0, n), slice(-d, n - d), slice(0, -d)
                table[:, dst] = table[:, src].clone()
                table[:, vacated] = -1
                for i in layers:
                    self.k[i][:, :, dst] = self.k[i][:, :, src].clone()
                    self.v[i][:, :, dst] = self.v[i][:, :, src].clone()
            elif d % size:  # a ring: rotate, so that slot = column % size still holds
                table.copy_(table.roll(-d, dims=1))
                for i in layers:
                    self.k[i].copy_(self.k[i].roll(-d, dims=2))
                    self.v[i].copy_(self.v[i].roll(-d, dims=2))
        self.length -= d

    def first_rows(self, n: int) -> RowCache:
        """A cache over rows [0, n) that shares this one's buffers: a forward pass over only the rows in use writes
        here. It keeps its own `length`; copy it back (`cache.length = view.length`) after the pass."""
        if not 1 <= n <= self.batch:
            raise ValueError(f"rows 0..{n - 1} are not in a cache of {self.batch}")
        if n == self.batch:
            return self
        view = copy.copy(self)  # the same layout (window, kinds, sizes, length); the tensors below are views
        view.batch = n
        view.k, view.v = [k[:n] for k in self.k], [v[:n] for v in self.v]
        view.slot_pos = {s: table[:n] for s, table in self.slot_pos.items()}
        view.steps = {}
        return view
