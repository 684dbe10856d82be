"""One decoding step as a function of fixed-shape tensors, which torch.compile takes whole (gpt-fast's recipe).

An eager decoding step (gemma.model.kv_cache) plans with Python integers: it attends over the first `length` slots
of a global layer's buffer, which grows by one every step. Compiled, every new length would be a new graph. Here
the step attends over the whole buffer of every layer, always, and what it may see is a mask computed in the graph
from the cache's slot-position tables, which the step updates in place as tensors: the column written is a tensor
too. The shapes of a step then depend only on the cache (rows, columns), so one graph serves every step of every
generation with that cache's shape, and torch.compile fuses the whole step, about 2000 small operations besides the
matrix products, into a few dozen loops. Keys past the filled columns hold position -1 and are masked out, so the
step computes what the eager one computes, to float32 rounding (the fused loops sum in another order).

Compiled, a single-row matrix product is written as a multiply and a sum (`layers.linear`), which Inductor turns
into one vectorised loop over the weight that reads it at about the memory speed, where the library's general
kernel and `torch.mv` do not (see the README's "Performance").
"""

from __future__ import annotations

import sys

import torch

from gemma.errors import GemmaError
from gemma.model.config import SLIDING
from gemma.model.kv_cache import KVCache


class StaticStep:
    """A KVCache seen by a one-token step of fixed shape: `plan` and `update` as the model calls them, with the
    column to write given as a tensor (`col`, shape (1,)) and every slot attended over under a mask."""

    def __init__(self, cache: KVCache):
        self.cache = cache
        self.col: torch.Tensor | None = None
        self.slots: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}

    def plan(self, positions: torch.Tensor) -> None:
        """positions (B, 1): record them in each kind's slot table and build its mask (B, 1, 1, slots)."""
        c = self.cache
        q = positions[:, :, None]  # (B, 1, 1)
        for kind in c.kinds:
            table = c.slot_pos[kind]
            size = table.shape[1]  # not c.sizes[kind], a Python int that would fix the size in the graph
            slot = self.col % size  # (1,)
            table.index_copy_(1, slot, positions)
            k = table[:, None, :]  # (B, 1, size)
            ok = (k >= 0) & (k <= q)
            if kind == SLIDING:
                ok = ok & ((q - k) < c.window)
            own = torch.arange(size, device=slot.device) == slot  # a query always sees its own slot
            self.masks[kind] = (ok | own)[:, None]
            self.slots[kind] = slot

    def update(self, layer: int, kind: str, k: torch.Tensor, v: torch.Tensor):
        kb, vb = self.cache.k[layer], self.cache.v[layer]
        kb.index_copy_(2, self.slots[kind], k)
        vb.index_copy_(2, self.slots[kind], v)
        return kb, vb, self.masks[kind]


def _step(model, view: StaticStep, tokens: torch.Tensor, positions: torch.Tensor):
    h = model.hidden_states(tokens, positions, cache=view)
    return model.logits(h)[:, 0]


def _columns_dynamic(cache: KVCache) -> None:
    """Tell torch.compile that the number of columns varies from cache to cache, so that one graph serves caches of
    every length (the buffers and slot tables that span the whole cache; a sliding layer's ring shorter than that
    keeps its fixed size)."""
    for kind in cache.kinds:
        if cache.sizes[kind] == cache.max_len:
            torch._dynamo.mark_dynamic(cache.slot_pos[kind], 1)
    for layer, kind in enumerate(cache.layer_kinds):
        if cache.sizes[kind] == cache.max_len and cache.k[layer].shape[2]:
            torch._dynamo.mark_dynamic(cache.k[layer], 2)
            torch._dynamo.mark_dynamic(cache.v[layer], 2)


def _signature(cache: KVCache, token: torch.Tensor) -> tuple:
    """What a step's graph depends on besides the number of columns (symbolic): the cache's class (the engine's
    differs), the rows, which buffers span the whole cache (those are symbolic; a sliding ring shorter than that
    has a fixed size), the device and dtype, the global modes a graph is traced under."""
    sizes = tuple((kind, None if cache.sizes[kind] == cache.max_len else cache.sizes[kind]) for kind in cache.kinds)
    modes = (torch.is_inference_mode_enabled(), torch.is_autocast_enabled(token.device.type))
    return (type(cache), token.shape[0], sizes, token.device, cache.k[0].dtype, modes)


def _fresh_step():
    """`_step` with a code object of its own: torch.compile keeps its compiled graphs and guards per code object, so
    that each signature's function holds exactly one graph."""
    code = _step.__code__.replace()
    return type(_step)(code, _step.__globals__, _step.__name__, _step.__defaults__, _step.__closure__)


class DecodeStep:
    """`step(cache, token (B,), position (B,)) -> logits (B, vocab)`: one decoding step over a static-shape view of
    `cache`, compiled with torch.compile (`compile=False`: the same step run eagerly, for checking it).

    The number of columns is symbolic in the graph, so caches of every length share one. Each signature (cache
    class, rows, which buffers span the cache, device, dtype, inference / autocast mode: `_signature`) gets a
    compiled function of its own, holding one graph. Its first call is compiled and checked by torch.compile's
    guards as usual; later calls skip evaluating the guards (`skip_guard_eval_unsafe`; 0.3-0.9 ms of a 13 ms step
    on the int4 270M here): the signature holds everything those guards check that changes between steps. Should
    a call still need another graph, torch.compile refuses rather than run the wrong one, and that signature goes
    back to checked guards. The model must not change its modules or their dtypes once compiled
    (gemma.model.compiled.uncompile_model first). Where compiling fails (no C++ compiler, an unsupported device, a
    mixture-of-experts layer's data-dependent routing), it says so once and the model's eager step runs from then
    on."""

    def __init__(self, model, compile: bool = True):
        self.model = model
        self.compiled = compile
        self.fns: dict[tuple, object] = {}  # by signature
        self.warm: dict[tuple, bool] = {}  # called once already; whether its guards may be skipped
        self.failed = False

    def __call__(self, cache: KVCache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        if cache.length + 1 > cache.max_len:
            raise GemmaError(f"the sequence ({cache.length + 1} tokens) exceeds the cache ({cache.max_len})")
        view = StaticStep(cache)
        view.col = torch.tensor([cache.length], device=token.device)
        with torch.no_grad():
            if self.compiled:
                logits = self._compiled(cache, view, token[:, None], position[:, None])
            else:
                logits = _step(self.model, view, token[:, None], position[:, None])
        cache.length += 1
        cache.steps = {}  # an eager plan of an earlier pass no longer holds
        return logits

    def _compiled(self, cache: KVCache, view: StaticStep, tokens: torch.Tensor, positions: torch.Tensor):
        key = _signature(cache, tokens)
        fn = self.fns.get(key)
        if fn is None:
            fn = self.fns[key] = torch.compile(_fresh_step(), fullgraph=True)
        _columns_dynamic(cache)
        if key not in self.warm:  # compiled now, its guards built and checked
            logits = fn(self.model, view, tokens, positions)
            self.warm[key] = True
            return logits
        if self.warm[key]:
            try:
                with torch.compiler.set_stance("default", skip_guard_eval_unsafe=True):
                    return fn(self.model, view, tokens, positions)
            except RuntimeError as exc:  # raised before the step ran anything
                if "skip_guard_eval_unsafe" not in str(exc):
                    raise
                self.warm[key] = False
        return fn(self.model, view, tokens, positions)

    def eager(self, cache: KVCache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.model(token[:, None], position[:, None], cache=cache)[:, 0]

    def step(self, cache: KVCache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """The compiled step, or the eager one once compiling has failed."""
        if self.failed:
            return self.eager(cache, token, position)
        try:
            return self(cache, token, position)
        except GemmaError:
            raise
        except Exception as exc:  # compiler errors come in many types
            if not self.compiled:
                raise
            self.failed = True
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            print(
                f"note: torch.compile of the decoding step failed ({type(exc).__name__}: {first}); running it "
                "uncompiled",
                file=sys.stderr,
            )
            return self.eager(cache, token, position)
