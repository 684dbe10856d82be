"""Continuous batching: concurrent generation requests share one model, one KV cache and one forward pass a step.

One background thread owns the model. Requests wait in a queue; each turn of the thread's loop
  1. retires the rows of cancelled requests,
  2. admits waiting requests into free rows: their prompts are prefilled together in a cache of their own and copied
     into the shared cache (`RowCache.load_row`, gemma.generation.rows),
  3. feeds every active row its latest token in one forward pass over the rows in use, and samples each row's next
     token with that request's own settings and RNG,
  4. hands each request its new text (as whole characters) and retires the rows that finished.
So a request that arrives while others generate joins the batch at the next step, and one that ends leaves it.

The shared cache (a RowCache, rows.py). Its columns advance together for all rows (see kv_cache.py). Each row's
tokens sit in consecutive columns that end at the cursor (`cache.length`): the token at position p at column offset
+ p, with the row's own offset. That keeps the sliding layers' ring buffers right: the slot a new column overwrites
holds the token that just left that row's window. A prompt of P tokens is placed to end at the cursor (offset =
cursor - P); when a new prompt is longer than what the cursor has behind it, or rows have left, `RowCache.shift`
moves the columns so that the cursor sits right after the longest row. Every row's past is shorter than the context
and its future at most the context, so a cache of twice the context in columns never runs out, and the global layers
attend over the longest row only. Positions, which RoPE sees, stay within the context; only columns go past it.

Greedy decoding gives what `gemma.generate` gives for the prompt alone, token for token, and seeded sampling draws
the same tokens (each request has its own RNG, used in the same order), when the model computes in fp32. In bf16 or
fp16 the rounding of a row's logits depends on the batch around it (how many rows, how much padding), so where two
tokens' logits nearly tie the pick can go either way with the batch's composition: seen with the 270M in bf16,
28 of 30 greedy replies equal to gemma.generate's under 8 concurrent clients.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from gemma.errors import GemmaError
from gemma.generation.sampling import SamplingParams, sample, sampling_params, seen_mask
from gemma.generation.text import TextStream
from gemma.generation.batch import check_prompt, left_pad
from gemma.generation.logprobs import MAX_TOP_LOGPROBS, TokenLogprob, next_token_logprob, prompt_logprobs
from gemma.generation.rows import RowCache
from gemma.generation.steps import decode_one_token, new_generator, prefill

log = logging.getLogger("gemma.generation.engine")


class EngineBusy(RuntimeError):
    """The queue of waiting requests is full (try again later)."""


class EngineClosed(RuntimeError):
    """The engine has been closed and takes no more requests."""


# ---- what a request receives ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delta:
    """New text of a request, never splitting a character (and never part of a stop string)."""

    text: str


@dataclass(frozen=True)
class Finish:
    """The end of a request: always its last event."""

    reason: str  # "stop" (stop id or string), "length" (max_new_tokens or the context's end), "cancelled", "error"
    token_ids: tuple[int, ...]  # the new ids, stop id excluded (as gemma.generate returns them)
    text: str  # the reply's text, cut before a stop string: all the Deltas joined
    prompt_tokens: int
    error: str | None = None  # what went wrong, for reason "error"
    # With logprobs asked for: a TokenLogprob of every token sampled, the stop id included (so that a reply
    # that stopped at once still scores its one token); and of the prompt's tokens ([0] is None: nothing before it).
    logprobs: tuple[TokenLogprob, ...] | None = None
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


Event = Delta | Finish


class Request:
    """One generation submitted to an Engine.

    Its events (`Delta`s, then one `Finish`) go to the `sink` given at submission (called on the engine's thread;
    it must not block), or else into a queue that iterating over the request reads. `cancel()` stops it at the next
    step; `result()` waits for the Finish.
    """

    _ids = itertools.count(1)

    def __init__(
        self,
        engine: "Engine",
        prompt: list[int],
        params: SamplingParams,
        max_new_tokens: int,
        stop_ids: frozenset[int],
        sink: Callable[[Event], None] | None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ):
        self.id = next(Request._ids)
        self.prompt, self.params, self.stop_ids = prompt, params, stop_ids
        self.logprobs, self.prompt_logprobs = logprobs, prompt_logprobs  # top alternatives to report, or None
        self.max_new_tokens = max_new_tokens  # params.max_new_tokens, capped at the context's end
        self.finish: Finish | None = None
        self._engine = engine
        self._queue: queue.SimpleQueue | None = queue.SimpleQueue() if sink is None else None
        self._sink = sink or self._queue.put
        self._cancelled = False
        self._done = threading.Event()

    def cancel(self) -> None:
        """Stop generating (a no-op once finished); the request then finishes with reason "cancelled"."""
        self._cancelled = True
        self._engine._wake()

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    def __iter__(self) -> Iterator[Event]:
        """The events as they come, up to and including the Finish (only for requests submitted without a sink)."""
        if self._queue is None:
            raise RuntimeError("this request's events go to its sink")
        while True:
            event = self._queue.get()
            yield event
            if isinstance(event, Finish):
                return

    def result(self, timeout: float | None = None) -> Finish:
        """Wait for the request to end and return its Finish (TimeoutError after `timeout` seconds)."""
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} has not finished")
        return self.finish

    def _emit(self, event: Event) -> None:
        if isinstance(event, Finish):
            self.finish = event
        try:
            self._sink(event)
        except Exception:  # the consumer is gone (e.g. its event loop closed): stop generating for it
            self._cancelled = True
        if isinstance(event, Finish):
            self._done.set()


# ---- the engine ------------------------------------------------------------------------------------------------


@dataclass
class _Row:
    """A request that holds a row of the shared cache."""

    request: Request
    pos: int  # its tokens in the cache, so the position of the next one fed
    token: int  # the latest sampled token, not yet fed
    ids: list[int]  # tokens generated (stop id excluded)
    sampled: int  # tokens sampled, stop id included (what max_new_tokens counts)
    stream: TextStream
    generator: torch.Generator
    seen: torch.Tensor | None  # (V,) tokens in the context, for a repetition penalty
    scored: list[TokenLogprob] | None = None  # the sampled tokens' log-probabilities, when asked for
    prompt_scored: tuple | None = None  # the prompt's, when asked for


@dataclass
class EngineStats:
    """Counters since the engine started (read from any thread)."""

    requests: int = 0  # requests finished, whatever the reason
    cancelled: int = 0
    errors: int = 0
    prompt_tokens: int = 0  # tokens prefilled
    new_tokens: int = 0  # tokens sampled
    steps: int = 0  # one-token forward passes over the batch
    rows_stepped: int = 0  # rows in those passes: rows_stepped / steps is the mean batch


class Engine:
    """Serves generation requests from any thread, batching those that run at the same time.

    `max_batch` rows share each forward pass; `max_len` caps the tokens one request spans (prompt and reply; by
    default the model's context); at most `max_waiting` requests queue for a row (`submit` raises EngineBusy
    beyond). `threads` sets torch's intra-op threads of the engine's thread. Use as a context manager, or call
    `close()`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_batch: int = 8,
        max_len: int | None = None,
        max_waiting: int = 1024,
        threads: int | None = None,
    ):
        cfg = model.config
        if isinstance(max_batch, bool) or not isinstance(max_batch, int) or max_batch < 1:
            raise GemmaError(f"max_batch must be a positive integer, got {max_batch!r}")
        if max_len is not None and (isinstance(max_len, bool) or not isinstance(max_len, int) or max_len < 2):
            raise GemmaError(f"max_len must be an integer of at least 2, got {max_len!r}")
        self.model, self.tokenizer = model.eval(), tokenizer
        self.context = min(cfg.max_seq_len, max_len or cfg.max_seq_len)  # tokens one request may span
        self.max_batch, self.max_waiting, self.threads = max_batch, max_waiting, threads
        # Columns are not positions: the cache may hold twice the context in columns (see the module docstring).
        self.cache = RowCache(cfg, max_batch, 2 * self.context, model.dtype, model.device)
        self.vocab_limit = tokenizer.vocab_size  # ids past it have no piece and are never sampled
        self.stats = EngineStats()
        self._rows: dict[int, _Row] = {}
        self._waiting: deque[Request] = deque()
        self._admitting: list[Request] = []
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._failure: BaseException | None = None  # what stopped the engine's thread, if anything did

    @property
    def cache_bytes(self) -> int:
        """Memory of the shared KV cache."""
        return sum(t.numel() * t.element_size() for t in self.cache.k + self.cache.v)

    @property
    def active(self) -> int:
        return len(self._rows)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def healthy(self) -> bool:
        """False once the engine is closed or its thread has died."""
        return not self._closed and self._failure is None and (self._thread is None or self._thread.is_alive())

    # ---- submitting (any thread) ----

    def submit(
        self,
        prompt: Sequence[int],
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        *,
        stop_ids: Sequence[int] | None = None,
        stop_strings: Sequence[str] | None = None,
        sink: Callable[[Event], None] | None = None,
        params: SamplingParams | None = None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
    ) -> Request:
        """Queue one prompt (token ids); settings as `gemma.generate`'s (or all of them as `params`). Bad settings
        raise GemmaError here.

        Generation ends after `max_new_tokens`, at the context's end (`max_len`), at a stop id (by default the
        tokenizer's `<eos>` and `<end_of_turn>`), or once the text holds a stop string.

        `logprobs=N` puts each sampled token's log-probability, with the N most likely alternatives, in the Finish;
        `prompt_logprobs=N` the same for the prompt's tokens (then `max_new_tokens` may be 0: the prompt is only
        scored). A prompt to score is prefilled alone, over all its positions, so that its figures are a full
        forward pass's.
        """
        params = sampling_params(
            params,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            stop_strings=stop_strings,
        )
        request = self._prepare(
            prompt, params, stop_ids=stop_ids, sink=sink, logprobs=logprobs, prompt_logprobs=prompt_logprobs
        )
        self._enqueue([request], limit=self.max_waiting)
        return request

    def run_all(
        self,
        prompts: Sequence[Sequence[int]],
        on_finish: Callable[[int, Finish], None] | None = None,
        *,
        params: SamplingParams | None = None,
        stop_ids: Sequence[int] | None = None,
        **settings,
    ) -> list[Finish]:
        """Generate for every prompt (all queued at once, whatever `max_waiting`) and return their Finishes in order.
        Settings as `submit`'s, the same for every prompt.

        `on_finish(index, finish)` is called on the engine's thread as each one ends (e.g. to advance a progress bar).
        """
        params = sampling_params(params, **settings)
        sinks = (
            [
                (lambda i: lambda event: on_finish(i, event) if isinstance(event, Finish) else None)(i)  # noqa: B023
                for i in range(len(prompts))
            ]
            if on_finish
            else [None] * len(prompts)
        )
        requests = [self._prepare(p, params, stop_ids=stop_ids, sink=sink) for p, sink in zip(prompts, sinks)]
        self._enqueue(requests, limit=None)
        try:
            return [r.result() for r in requests]
        finally:
            for r in requests:
                r.cancel()

    def generate(self, prompts: Sequence[Sequence[int]], **settings) -> list[list[int]]:
        """`gemma.generate` through the engine: the new ids of each prompt."""
        finishes = self.run_all(prompts, **settings)
        for f in finishes:
            if f.reason == "error":
                raise RuntimeError(f"generation failed: {f.error}")
        return [list(f.token_ids) for f in finishes]

    def _prepare(
        self,
        prompt,
        params: SamplingParams | None = None,
        *,
        stop_ids=None,
        sink=None,
        logprobs: int | None = None,
        prompt_logprobs: int | None = None,
        **settings,
    ) -> Request:
        """A Request for `prompt`, or a GemmaError. The settings (`params`, or keywords) are checked first, before
        anything of the engine's is looked at."""
        params = sampling_params(params, **settings)
        for name, top in (("logprobs", logprobs), ("prompt_logprobs", prompt_logprobs)):
            if top is not None and (
                isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_TOP_LOGPROBS
            ):
                raise GemmaError(f"{name} must be an integer in [0, {MAX_TOP_LOGPROBS}] or None, got {top!r}")
        prompt = check_prompt(prompt, self.model.config.vocab_size, self.context)
        stops = frozenset(self.tokenizer.stop_ids if stop_ids is None else stop_ids)
        max_new = min(params.max_new_tokens, self.context - len(prompt))
        return Request(self, prompt, params, max_new, stops, sink, logprobs, prompt_logprobs)

    def _enqueue(self, requests: list[Request], limit: int | None) -> None:
        with self._cond:
            if self._closed:
                raise EngineClosed("the engine is closed")
            if self._failure is not None:
                raise EngineClosed(f"the engine stopped: {self._failure}")
            if limit is not None and len(self._waiting) + len(requests) > limit:
                raise EngineBusy(f"{len(self._waiting)} requests are already waiting")
            for r in requests:
                if r.max_new_tokens == 0 and r.prompt_logprobs is None:  # nothing to compute
                    r._emit(Finish("length", (), "", len(r.prompt), logprobs=() if r.logprobs is not None else None))
                else:
                    self._waiting.append(r)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gemma-engine", daemon=True)
                self._thread.start()
            self._cond.notify()

    def _wake(self) -> None:
        with self._cond:
            self._cond.notify()

    def close(self) -> None:
        """Stop the engine's thread; requests still waiting or running finish with reason "error"."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join()
        self._finish_everything("the engine was closed")

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- the engine's thread ----

    def _run(self) -> None:
        if self.threads:
            torch.set_num_threads(self.threads)  # intra-op threads are set per thread
        try:
            with torch.no_grad():
                while True:
                    with self._cond:
                        while not self._closed and not self._rows and not self._waiting:
                            self._cond.wait()
                        if self._closed:
                            return
                        self._admitting = self._take_admissible()
                    try:
                        self._retire_cancelled()
                        if self._admitting:
                            self._admit(self._admitting)
                        self._admitting = []
                        if self._rows:
                            self._step()
                    except Exception as exc:  # a failed pass: fail the requests it served, then carry on
                        log.exception("generation step failed")
                        self._fail_rows(f"{type(exc).__name__}: {exc}")
        except BaseException as exc:  # pragma: no cover - the thread itself failed; say so to every caller
            self._failure = exc
            log.exception("the engine's thread stopped")
            self._finish_everything(f"the engine stopped: {exc}")

    def _take_admissible(self) -> list[Request]:
        """Pop the waiting requests that get a row now (cancelled ones are finished instead). Holds the lock."""
        if any(r.cancelled for r in self._waiting):
            for r in [r for r in self._waiting if r.cancelled]:
                self._finish_unstarted(r, "cancelled")
            self._waiting = deque(r for r in self._waiting if not r.cancelled)
        free = self.max_batch - len(self._rows)
        return [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]

    def _admit(self, requests: list[Request]) -> None:
        """Prefill the prompts of `requests` together, except those to score, which go one by one."""
        plain = [r for r in requests if r.prompt_logprobs is None]
        for group in ([plain] if plain else []) + [[r] for r in requests if r.prompt_logprobs is not None]:
            self._admit_group(group)

    def _admit_group(self, requests: list[Request]) -> None:
        """Prefill the prompts of `requests` together, copy them into free rows, sample their first tokens. A prompt
        to score comes alone: its logits at every position are a full forward pass's (no padding, no other rows)."""
        device, cfg = self.model.device, self.model.config
        width = max(len(r.prompt) for r in requests)
        tokens, positions = left_pad([r.prompt for r in requests], self.tokenizer.pad_id, device)  # as generate does
        staging = self.model.new_cache(len(requests), width)
        self.stats.prompt_tokens += sum(len(r.prompt) for r in requests)
        scored = None
        if requests[0].prompt_logprobs is not None:
            request = requests[0]
            hidden = self.model.hidden_states(tokens, positions, cache=staging)  # (1, P, hidden)
            scored = tuple(
                prompt_logprobs(self.model, hidden, request.prompt, request.prompt_logprobs, self.vocab_limit)
            )
            if request.max_new_tokens == 0:  # the prompt alone was to be scored
                self._count("length")
                request._emit(
                    Finish(
                        "length",
                        (),
                        "",
                        len(request.prompt),
                        None,
                        () if request.logprobs is not None else None,
                        scored,
                    )
                )
                return
            logits = self.model.logits(hidden[:, -1:])[:, 0]
        else:
            logits = prefill(self.model, staging, tokens, positions)  # (n, V)
        free = [r for r in range(self.max_batch) if r not in self._rows][: len(requests)]
        self._move_cursor(max([width] + [row.pos for row in self._rows.values()]))
        for i, (request, slot) in enumerate(zip(requests, free)):
            P = len(request.prompt)
            self.cache.load_row(slot, staging, i, self.cache.length - P)
            seen = (
                seen_mask([request.prompt], cfg.vocab_size, device)[0]
                if request.params.repetition_penalty != 1.0
                else None
            )
            self._rows[slot] = _Row(
                request,
                P,
                -1,
                [],
                0,
                TextStream(self.tokenizer, request.params.stop_strings),
                new_generator(request.params.seed, device),
                seen,
                [] if request.logprobs is not None else None,
                scored,
            )
        self._mask_vocab(logits)
        for i, slot in enumerate(free):
            self._take(slot, logits[i : i + 1])

    def _step(self) -> None:
        """One token for every active row, in one forward pass over rows [0, highest active row]."""
        if self.cache.length + 1 > self.cache.max_len:  # never, by the layout's arithmetic; kept as a guard
            self._move_cursor(max(row.pos for row in self._rows.values()))
        device = self.model.device
        n = max(self._rows) + 1
        tokens = torch.full((n,), self.tokenizer.pad_id, dtype=torch.long)
        positions = torch.full((n,), -1, dtype=torch.long)  # rows without a request feed padding
        for slot, row in self._rows.items():
            tokens[slot], positions[slot] = row.token, row.pos
        view = self.cache.first_rows(n)
        logits = decode_one_token(self.model, view, tokens.to(device), positions.to(device))  # (n, V)
        self.cache.length = view.length
        self.stats.steps += 1
        self.stats.rows_stepped += len(self._rows)
        self._mask_vocab(logits)
        # Plain greedy rows take one argmax together (one device sync); the others sample with their own RNG.
        greedy = [slot for slot, row in self._rows.items() if row.request.params.greedy and row.seen is None]
        picked = dict(zip(greedy, logits[greedy].argmax(dim=-1).tolist())) if greedy else {}
        for slot, row in list(self._rows.items()):
            row.pos += 1
            if slot in picked:
                self._accept(slot, picked[slot], logits[slot])
            else:
                self._take(slot, logits[slot : slot + 1])
        self._compact()

    def _mask_vocab(self, logits: torch.Tensor) -> None:
        """Ids past the tokenizer's pieces (padding rows of the embedding) are never sampled."""
        if self.vocab_limit < logits.shape[-1]:
            logits[:, self.vocab_limit :] = float("-inf")

    def _take(self, slot: int, logits: torch.Tensor) -> None:
        """Sample a row's next token and accept it; a failure (logits the model made NaN, say) ends that request
        alone."""
        try:
            token = self._sample(self._rows[slot], logits)
        except Exception as exc:
            return self._retire(slot, "error", f"sampling failed: {exc}")
        self._accept(slot, token, logits)

    def _sample(self, row: _Row, logits: torch.Tensor) -> int:
        """The next token of one row from its (masked) logits (1, V), with its request's settings and RNG."""
        seen = row.seen[None] if row.seen is not None else None
        token = int(sample(logits, row.request.params, row.generator, seen)[0])
        if row.seen is not None:
            row.seen[token] = True
        return token

    def _accept(self, slot: int, token: int, logits: torch.Tensor) -> None:
        """Record a row's sampled token (and its log-probability from the row's `logits`, when asked for): stream
        its text, or finish the request."""
        row = self._rows[slot]
        request = row.request
        if row.scored is not None:
            row.scored.append(next_token_logprob(logits, token, request.logprobs, self.vocab_limit))
        row.sampled += 1
        self.stats.new_tokens += 1
        if token in request.stop_ids:
            return self._retire(slot, "stop")
        row.ids.append(token)
        piece = row.stream.push(token)
        if piece:
            request._emit(Delta(piece))
        if row.stream.stopped:
            return self._retire(slot, "stop")
        if row.sampled >= request.max_new_tokens:
            return self._retire(slot, "length")
        row.token = token

    def _retire(self, slot: int, reason: str, error: str | None = None) -> None:
        row = self._rows.pop(slot)
        self.cache.reset_row(slot)
        if reason in ("stop", "length"):
            rest = row.stream.finish()
            if rest:
                row.request._emit(Delta(rest))
            if row.stream.stopped:  # a stop string completed in the text held back until now
                reason = "stop"
        self._count(reason)
        scored = tuple(row.scored) if row.scored is not None else None
        row.request._emit(
            Finish(reason, tuple(row.ids), row.stream.text, len(row.request.prompt), error, scored, row.prompt_scored)
        )

    def _retire_cancelled(self) -> None:
        for slot in [s for s, row in self._rows.items() if row.request.cancelled]:
            self._retire(slot, "cancelled")
        self._compact()

    def _compact(self) -> None:
        """After rows leave: start afresh when none is left, or move the columns back when much of the attended span
        has become empty (it is attended over at every step)."""
        if not self._rows:
            self.cache.reset()
            return
        waste = self.cache.length - max(row.pos for row in self._rows.values())
        if waste > max(64, self.cache.length // 2):
            self.cache.shift(waste)

    def _move_cursor(self, target: int) -> None:
        """Shift the columns so that the cursor is at `target` (at least the longest active row)."""
        if not self._rows:
            self.cache.reset()  # every slot is empty: any cursor is consistent
            self.cache.length = target
        else:
            self.cache.shift(self.cache.length - target)

    def _count(self, reason: str) -> None:
        self.stats.requests += 1
        self.stats.cancelled += reason == "cancelled"
        self.stats.errors += reason == "error"

    def _finish_unstarted(self, request: Request, reason: str, error: str | None = None) -> None:
        self._count(reason)
        request._emit(Finish(reason, (), "", len(request.prompt), error))

    def _fail_rows(self, error: str) -> None:
        """Finish every request being served with an error and start the cache afresh."""
        for slot in list(self._rows):
            self._retire(slot, "error", error)
        for request in self._admitting:
            if request.finish is None:
                self._finish_unstarted(request, "error", error)
        self._admitting = []
        self.cache.reset()

    def _finish_everything(self, error: str) -> None:
        with self._cond:
            waiting, self._waiting = list(self._waiting), deque()
        for request in waiting:
            self._finish_unstarted(request, "error", error)
        if self._thread is None or not self._thread.is_alive():
            self._fail_rows(error)
