"""The KV cache: preallocated per-layer buffers written in place, static shapes, explicit setup and reset.

Columns ("slots") are shared by the whole batch: the t-th token fed to the model goes to slot t of every row.
Each row keeps the RoPE position held in each slot (-1 for empty or padding), so rows of different lengths
(left padding) share one cache and one forward pass. Global layers keep every slot up to `max_len`; sliding-window
layers keep only the last `window` slots in a ring buffer, so their memory grows with the window, not the context.
Per-kind tables are keyed by the layer kind, `SLIDING` or `FULL` (gemma.model.config).

A plain object, not an nn.Module: its tensors live in lists and dicts, which a module would neither register nor
move, and it has no parameters; it is made on its device, in its dtype. The engine's row operations (rows joining
and leaving a shared cache) are in gemma.generation.rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma.model.config import SLIDING, GemmaConfig
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


class KVCache:
    """Keys and values of `batch` rows over `max_len` columns, for the layers `cfg` describes.

    `max_len` counts columns, not positions: a cache for one sequence needs no more than the model's context
    (`Gemma.new_cache` holds it to that), but a cache whose rows come and go may span more columns than any row's
    positions (gemma.generation.rows)."""

    def __init__(self, cfg: GemmaConfig, batch: int, max_len: int, dtype: torch.dtype, device=None):
        self.batch, self.max_len, self.window = batch, max_len, cfg.sliding_window
        self.kinds = sorted(set(cfg.layer_types))  # the layer kinds present: SLIDING and/or FULL
        self.layer_kinds = list(cfg.layer_types)  # each layer's kind
        self.sizes = {s: (min(self.window, max_len) if s == SLIDING else max_len) for s in self.kinds}

        # A layer that reuses another's keys and values (KV sharing) writes none: its buffers are empty.
        def shape(i: int, s: str) -> tuple[int, ...]:
            return (batch, 0 if cfg.reuses_kv(i) else cfg.kv_heads_of(s), self.sizes[s], cfg.head_dim_of(s))

        self.k = [torch.zeros(shape(i, kind), dtype=dtype, device=device) for i, kind in enumerate(self.layer_kinds)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.slot_pos = {s: torch.full((batch, self.sizes[s]), -1, dtype=torch.long, device=device) for s in self.kinds}
        self.length = 0  # columns fed so far
        self.steps: dict[str, Step] = {}

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
        causal = (
            new_only
            and (self.window is None or T <= self.window)
            and bool((positions >= 0).all())
            and bool((positions[:, 1:] > positions[:, :-1]).all())
        )
        self.steps = {}
        for s in self.kinds:
            size, old = self.sizes[s], self.slot_pos[s]
            ring_prefill = s == SLIDING and T > 1 and size < self.max_len
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
                used = size if s == SLIDING and size < self.max_len else self.length + T
                key_pos, keys = key_pos[:, :used], "buffer"
            keep_from = max(0, T - size)
            mask = None if causal else self._mask(positions, key_pos, query_slot, s)
            self.steps[s] = Step(write=cols[keep_from:] % size, keep_from=keep_from, keys=keys, used=used, mask=mask)
        for s in self.kinds:
            self.slot_pos[s][:, self.steps[s].write] = positions[:, self.steps[s].keep_from :]
        self.length += T

    def _mask(self, q_pos, k_pos, q_slot, kind: str) -> torch.Tensor:
        q, k = q_pos[:, :, None], k_pos[:, None, :]  # (B, T, 1), (B, 1, S)
        ok = (k >= 0) & (k <= q)
        if kind == SLIDING:
            ok &= (q - k) < self.window
        # Each column also sees its own slot, so a padding query (position -1) never has an empty softmax row.
        own = q_slot[:, None] == torch.arange(k_pos.shape[1], device=k_pos.device)[None, :]  # (T, S)
        return (ok | own[None])[:, None]  # (B, 1, T, S)

    def update(self, layer: int, kind: str, k: torch.Tensor, v: torch.Tensor):
        """Store the new k, v (B, KV, T, hd) of `layer`, of kind `kind` (SLIDING or FULL); return the keys, values
        and mask to attend over (None: plain causal attention over the new columns)."""
        step = self.steps[kind]
        kb, vb = self.k[layer], self.v[layer]
        if step.keys == "concat":
            keys, values = torch.cat([kb, k], dim=2), torch.cat([vb, v], dim=2)
        elif step.keys == "new":
            keys, values = k, v
        kb[:, :, step.write] = k[:, :, step.keep_from :]
        vb[:, :, step.write] = v[:, :, step.keep_from :]
        if step.keys == "buffer":
            keys, values = kb[:, :, : step.used], vb[:, :, : step.used]
        return keys, values, step.mask
