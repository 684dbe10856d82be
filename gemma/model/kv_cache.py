"""The KV cache: preallocated per-layer buffers written in place, static shapes, explicit setup and reset.

Columns ("slots") are shared by the whole batch: the t-th token fed to the model goes to slot t of every row.
Each row keeps the RoPE position held in each slot (-1 for empty or padding), so rows of different lengths
(left padding) share one cache and one forward pass. Global layers keep every slot up to `max_len`; sliding-window
layers keep only the last `window` slots in a ring buffer, so their memory grows with the window, not the context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from gemma.model.config import GemmaConfig
from gemma.errors import GemmaError


@dataclass
class Step:
    """What one forward pass does to the cache of one kind of layer (computed once, shared by those layers)."""

    write: torch.Tensor  # slot index of each new column written (T',)
    keep_from: int  # first new column that is written (a ring holds at most `size` of them)
    keys: str  # what to attend over: "buffer" (its first `used` slots), "concat" (the old slots, then the new
    #            columns: a ring prefill, which must not overwrite keys its own queries still need) or "new" (only
    #            the new columns: nothing was cached before them)
    used: int  # slots to attend over from the buffer
    mask: torch.Tensor | None  # (B, 1, T, S) True where a query may attend to a key; None: plain causal, T == S


class KVCache(nn.Module):
    def __init__(self, cfg: GemmaConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        super().__init__()
        if max_len > cfg.max_seq_len:
            raise GemmaError(f"a cache of {max_len} tokens exceeds the model's context of {cfg.max_seq_len}")
        self.batch, self.max_len, self.window = batch, max_len, cfg.sliding_window
        self.kinds = sorted(set(cfg.is_sliding(i) for i in range(cfg.num_layers)))
        self.layer_kinds = [cfg.is_sliding(i) for i in range(cfg.num_layers)]  # each layer's kind (True: sliding)
        self.sizes = {s: (min(self.window, max_len) if s else max_len) for s in self.kinds}
        shape = lambda s: (batch, cfg.num_kv_heads, self.sizes[s], cfg.head_dim)  # noqa: E731
        self.k = [torch.zeros(shape(cfg.is_sliding(i)), dtype=dtype, device=device) for i in range(cfg.num_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.slot_pos = {s: torch.full((batch, self.sizes[s]), -1, dtype=torch.long, device=device)
                         for s in self.kinds}
        self.length = 0  # columns fed so far
        self.steps: dict[bool, Step] = {}

    def reset(self) -> None:
        for table in self.slot_pos.values():
            table.fill_(-1)
        self.length = 0

    def truncate(self, length: int) -> None:
        """Forget every column from `length` on (e.g. a rejected continuation); global layers only keep them."""
        if length > self.length:
            raise ValueError("cannot truncate forward")
        if any(self.sizes[s] < self.length for s in self.kinds) and length < self.length:
            # A ring has overwritten slots that the shorter history would need again.
            raise GemmaError("cannot rewind a sliding-window cache that has wrapped; reset and prefill instead")
        for s in self.kinds:
            self.slot_pos[s][:, length:] = -1
        self.length = length

    def plan(self, positions: torch.Tensor) -> None:
        """Prepare one forward pass of T new columns at `positions` (B, T), -1 marking padding."""
        B, T = positions.shape
        if B != self.batch:
            raise ValueError(f"batch {B} does not match the cache's {self.batch}")
        if self.length + T > self.max_len:
            raise GemmaError(f"the sequence ({self.length + T} tokens) exceeds the cache ({self.max_len})")
        cols = self.length + torch.arange(T, device=positions.device)
        new_only = self.length == 0 and T > 1
        # A fresh prompt without padding that fits every window needs only the causal mask (SDPA's fast path).
        causal = new_only and (self.window is None or T <= self.window) and bool((positions >= 0).all()) and bool(
            (positions[:, 1:] > positions[:, :-1]).all())
        self.steps = {}
        for s in self.kinds:
            size, old = self.sizes[s], self.slot_pos[s]
            ring_prefill = s and T > 1 and size < self.max_len
            if new_only:
                key_pos, query_slot, keys = positions, torch.arange(T, device=positions.device), "new"
                used = T
            elif ring_prefill:
                # Writing first would overwrite keys that earlier queries of this chunk still need.
                key_pos = torch.cat([old, positions], dim=1)  # (B, size + T)
                query_slot = size + torch.arange(T, device=positions.device)
                used, keys = size + T, "concat"
            else:
                key_pos = old.clone()
                key_pos[:, cols % size] = positions
                query_slot = cols % size
                used = size if s and size < self.max_len else self.length + T
                key_pos, keys = key_pos[:, :used], "buffer"
            keep_from = max(0, T - size)
            mask = None if causal else self._mask(positions, key_pos, query_slot, s)
            self.steps[s] = Step(write=cols[keep_from:] % size, keep_from=keep_from, keys=keys, used=used, mask=mask)
        for s in self.kinds:
            self.slot_pos[s][:, self.steps[s].write] = positions[:, self.steps[s].keep_from:]
        self.length += T

    def _mask(self, q_pos, k_pos, q_slot, sliding: bool) -> torch.Tensor:
        q, k = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, S)
        ok = (k >= 0) & (k <= q)
        if sliding:
            ok &= (q - k) < self.window
        # Each column also sees its own slot, so a padding query (position -1) never has an empty softmax row.
        own = q_slot[:, None] == torch.arange(k_pos.shape[1], device=k_pos.device)[None, :]  # (T, S)
        return (ok | own[None])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, sliding: bool, k: torch.Tensor, v: torch.Tensor):
        """Store the new k, v (B, KV, T, hd) of `layer`; return the keys, values and mask to attend over (None:
        plain causal attention over the new columns)."""
        step = self.steps[sliding]
        kb, vb = self.k[layer], self.v[layer]
        if step.keys == "concat":
            keys, values = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)
        elif step.keys == "new":
            keys, values = k, v
        kb[:, :, step.write] = k[:, :, step.keep_from:]
        vb[:, :, step.write] = v[:, :, step.keep_from:]
        if step.keys == "buffer":
            keys, values = kb[:, :, :step.used], vb[:, :, :step.used]
        return keys, values, step.mask

    # ---- rows that come and go: a batch whose requests join and leave at different times (the engine) ----
    #
    # Every row's tokens sit in consecutive columns ending at the shared cursor (`length`), at column offset + p for
    # the token at position p. Sliding layers then stay correct: the slot a new column overwrites holds the token
    # that just left the window. These methods keep that layout while rows are emptied, filled or moved.

    def reset_row(self, row: int) -> None:
        """Forget everything row `row` holds; the other rows are untouched."""
        for table in self.slot_pos.values():
            table[row] = -1

    def load_row(self, row: int, src: "KVCache", src_row: int, offset: int) -> None:
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
                raise ValueError(f"positions {int(p.min())}..{int(p.max())} at offset {offset} do not fit before "
                                 f"the cursor ({self.length})")
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

    def first_rows(self, n: int) -> "KVCache":
        """A cache over rows [0, n) that shares this one's buffers: a forward pass over only the rows in use writes
        here. It keeps its own `length`; copy it back (`cache.length = view.length`) after the pass."""
        if not 1 <= n <= self.batch:
            raise ValueError(f"rows 0..{n - 1} are not in a cache of {self.batch}")
        if n == self.batch:
            return self
        view = KVCache.__new__(KVCache)
        nn.Module.__init__(view)
        view.batch, view.max_len, view.window = n, self.max_len, self.window
        view.kinds, view.layer_kinds, view.sizes = self.kinds, self.layer_kinds, self.sizes
        view.k, view.v = [k[:n] for k in self.k], [v[:n] for v in self.v]
        view.slot_pos = {s: table[:n] for s, table in self.slot_pos.items()}
        view.length, view.steps = self.length, {}
        return view
