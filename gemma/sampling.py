"""Generation with the KV cache: sampling filters as small pure functions, `prefill`, `decode_one_token`, a batched
`generate`, a streaming form that yields text without ever splitting a character, and a chat session that keeps
its cache between turns.

The filters follow transformers' definitions and order (repetition penalty, then temperature, top-k, top-p,
min-p), so a setting means here what it means there. Each works on float32 logits (B, V) and costs O(V) per step;
only top-p sorts the vocabulary, and only when it is on.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from gemma.errors import GemmaError
from gemma.files import has_lone_surrogate

REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to


# ---- sampling settings and filters ----------------------------------------------------------------------------


# Below this temperature sampling is greedy. Sampling at T keeps a token whose logit is d below the top one with
# probability exp(-d / T), which float32 holds as exactly 0 once d > 104 T: at T = 1e-5 only tokens within 0.001 of
# the top remain, a finer spacing than bf16 logits have (0.0625 at 10), so the draw is already the argmax but for
# near-ties. Greedy is that limit without the arithmetic of a tiny T: one that float32 holds as 0 (below 1e-45), or
# whose reciprocal overflows (below 3e-39), turns the top logit into NaN.
MIN_TEMPERATURE = 1e-5
_FLOAT32 = torch.finfo(torch.float32)


def _number(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def check_settings(temperature=0.0, top_k=None, top_p=None, min_p=None, repetition_penalty=1.0,
                   max_new_tokens=None, seed=None, *, min_new_tokens: int = 0,
                   spell: Callable[[str], str] = str) -> None:
    """Refuse generation settings that are not numbers or out of their range: a GemmaError naming the first bad one
    as `spell` writes its name (tools/chat.py passes its flags: `--top-p`), with its range. `max_new_tokens` and
    `seed` are checked when given; `max_new_tokens` must be at least `min_new_tokens`.

    The ranges are those the arithmetic stays finite over in float32: a temperature or repetition penalty past
    float32's largest number (3.4e38) becomes infinity there, a penalty below its smallest normal number (1.2e-38)
    becomes 0 or loses its reciprocal, and either then turns logits into NaN."""
    def refuse(name, rule, value):
        raise GemmaError(f"{spell(name)} must be {rule}, got {value!r}")

    if not _number(temperature) or not 0 <= temperature < math.inf:  # also refuses NaN
        refuse("temperature", "a finite number >= 0 (0 = greedy)", temperature)
    if temperature > _FLOAT32.max:
        refuse("temperature", f"at most {_FLOAT32.max:.3g} (float32's largest number)", temperature)
    if top_k is not None and (not _integer(top_k) or top_k < 1):
        refuse("top_k", "a positive integer", top_k)
    if top_p is not None and (not _number(top_p) or not 0 < top_p <= 1):
        refuse("top_p", "a number in (0, 1]", top_p)
    if min_p is not None and (not _number(min_p) or not 0 <= min_p <= 1):
        refuse("min_p", "a number in [0, 1]", min_p)
    if not _number(repetition_penalty) or not 0 < repetition_penalty < math.inf:
        refuse("repetition_penalty", "a finite number > 0 (1 = off)", repetition_penalty)
    if not _FLOAT32.tiny <= repetition_penalty <= _FLOAT32.max:
        refuse("repetition_penalty", f"in [{_FLOAT32.tiny:.3g}, {_FLOAT32.max:.3g}] (float32's normal numbers)",
               repetition_penalty)
    if max_new_tokens is not None and (not _integer(max_new_tokens) or max_new_tokens < min_new_tokens):
        refuse("max_new_tokens", "a positive integer" if min_new_tokens == 1 else
               f"an integer >= {min_new_tokens}", max_new_tokens)
    if seed is not None and (not _integer(seed) or not -(1 << 63) <= seed < (1 << 64)):  # what torch.Generator takes
        refuse("seed", "an integer in [-2**63, 2**64)", seed)


def check_stop_strings(stop_strings: Sequence[str] | None) -> tuple[str, ...]:
    stops = tuple(stop_strings or ())
    if any(not isinstance(s, str) or not s for s in stops):
        raise GemmaError("stop strings must be non-empty strings")
    return stops


@dataclass(frozen=True)
class SamplingParams:
    """How to generate, as one object that travels from an entry point (`generate`, `stream_generate`,
    `ChatSession`, `Engine.submit`, the chat tool, the server) to the sampler, checked once: at construction (a
    GemmaError naming the first bad field). The filters are what `sample` reads; the rest is read where a
    generation starts and ends. As vLLM's SamplingParams, one object rather than filters and a second one for
    length, seed and stops: every caller that has the one has the other."""

    temperature: float = 0.0  # 0 (or below MIN_TEMPERATURE) = greedy; otherwise logits are divided by it
    top_k: int | None = None  # keep only the k most likely tokens (ties with the k-th kept too)
    top_p: float | None = None  # keep the smallest set of most likely tokens whose probability reaches p
    min_p: float | None = None  # drop tokens less likely than min_p times the most likely one
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (transformers' rule); 1 = off
    max_new_tokens: int = 256  # tokens sampled at most (stop id included); the context's end may come first
    seed: int | None = None  # seeds the generation's own RNG; None = seeded from the OS
    stop_strings: tuple[str, ...] = ()  # the text ends before the first of these to complete (any sequence given)

    def __post_init__(self):
        check_settings(self.temperature, self.top_k, self.top_p, self.min_p, self.repetition_penalty,
                       self.max_new_tokens, self.seed)
        object.__setattr__(self, "stop_strings", check_stop_strings(self.stop_strings))  # frozen: set once

    @property
    def greedy(self) -> bool:
        return self.temperature < MIN_TEMPERATURE


_DEFAULTS = SamplingParams()


def _at_default(name: str, value) -> bool:
    if name == "stop_strings":
        return not value  # None, () and [] all mean none
    default = getattr(_DEFAULTS, name)
    return value is default or (not isinstance(value, bool) and value == default)


def sampling_params(params: SamplingParams | None = None, **settings) -> SamplingParams:
    """The settings of an entry point as one SamplingParams: `params` itself, or one built (and so checked) from
    the keyword settings (`temperature=...`) the entry point also takes. Both at once are refused, unless the
    keywords are at their defaults."""
    if params is None:
        return SamplingParams(**settings)
    if not isinstance(params, SamplingParams):
        raise GemmaError(f"params must be a SamplingParams, got {type(params).__name__}")
    both = [name for name, value in settings.items() if not _at_default(name, value)]
    if both:
        raise GemmaError(f"give the settings either as params or as keywords, not both ({', '.join(both)})")
    return params


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor: over the tokens already in the context (`seen`, a (B, V)
    boolean mask), divide positive logits by `penalty` and multiply negative ones by it."""
    penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
    # A penalty below 1 can push a logit past float32's range; +inf would make the softmax NaN.
    return torch.where(seen, penalized.clamp(max=torch.finfo(logits.dtype).max), logits)


def top_k_filter(logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest logits of each row (and any tied with the k-th); the rest become -inf."""
    if k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p (at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    before = probs.cumsum(dim=-1) - probs  # probability of the tokens ranked above each one
    drop = before >= p
    drop[..., 0] = False
    return logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))


def min_p_filter(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Drop tokens whose probability is below min_p times the row's largest probability.

    p_i < min_p * p_max  <=>  logit_i < logit_max + log(min_p): no softmax needed."""
    if min_p <= 0:
        return logits
    threshold = logits.max(dim=-1, keepdim=True).values + math.log(min_p)
    return logits.masked_fill(logits < threshold, float("-inf"))


def logits_to_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, then softmax: (B, V) float logits -> (B, V) probabilities.

    The logits are shifted so that the largest is 0 before dividing by the temperature: every result is then 0 or
    below, so no temperature overflows one to +inf (which softmax turns into NaN). Softmax and the filters do not
    see a shift."""
    logits = (logits - logits.max(dim=-1, keepdim=True).values) / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p is not None:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p is not None:
        logits = min_p_filter(logits, params.min_p)
    return torch.softmax(logits, dim=-1)


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """(B, V) logits -> (B,) next token ids: argmax at temperature 0, otherwise a draw from the filtered
    distribution using `generator` (so a seed reproduces it, whatever the global RNG does)."""
    if seen is not None and params.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(dim=-1)
    probs = logits_to_probs(logits, params)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def seen_mask(rows: Sequence[Sequence[int]], vocab: int, device=None) -> torch.Tensor:
    """(B, V) boolean mask of the tokens present in each row (the context a repetition penalty looks at)."""
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=device)
    for b, row in enumerate(rows):
        if len(row):
            seen[b, torch.as_tensor(list(row), device=device)] = True
    return seen


# ---- the model steps -------------------------------------------------------------------------------------------


def prefill(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Feed `tokens` (B, T) at `positions` (B, T; -1 marks left padding) into `cache`; return the logits (B, V)
    of the last column, the only ones generation needs (the output head is the largest matmul)."""
    with torch.no_grad():
        h = model.hidden_states(tokens, positions, cache=cache, last_only=True)  # (B, 1, hidden)
        return model.logits(h)[:, 0]


def decode_one_token(model, cache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Feed one token per row, (B,) at (B,) positions; return the next logits (B, V)."""
    with torch.no_grad():
        return model(token[:, None], position[:, None], cache=cache)[:, 0]


@dataclass
class GenerationStats:
    """Token counts and model time of one generation (per row; a batch does B times the tokens)."""

    prompt_tokens: int = 0  # columns prefilled
    prefill_s: float = 0.0  # prefill forward pass and the first sample
    new_tokens: int = 0  # tokens sampled
    decode_steps: int = 0  # one-token forward passes
    decode_s: float = 0.0  # time in those passes and their samples

    @property
    def prefill_tokens_per_s(self) -> float:
        return self.prompt_tokens / self.prefill_s if self.prefill_s else 0.0

    @property
    def decode_tokens_per_s(self) -> float:
        return self.decode_steps / self.decode_s if self.decode_s else 0.0

    def summary(self) -> str:
        return (f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.2f}s "
                f"({self.prefill_tokens_per_s:.1f} tokens/s), decode {self.new_tokens} tokens "
                f"({self.decode_tokens_per_s:.1f} tokens/s)")


def decode_steps(model, cache, tokens: torch.Tensor, positions: torch.Tensor, max_new_tokens: int,
                 params: SamplingParams, generator: torch.Generator | None = None, seen: torch.Tensor | None = None,
                 vocab_limit: int | None = None, stats: GenerationStats | None = None) -> Iterator[list[int]]:
    """Prefill, then one token at a time: yields each step's sampled ids (a list of B ints).

    A sampled token is fed to the model only when the consumer asks for the next one, so stopping (closing the
    iterator) never costs a forward pass, and the cache then holds everything but the last yielded token. Rows
    that the consumer considers finished keep running; their tokens are simply ignored. Ids at or past
    `vocab_limit` (embedding rows the tokenizer has no piece for) are never sampled.
    """
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = tokens.shape[1]
    rows = torch.arange(tokens.shape[0], device=tokens.device)
    next_pos = positions[:, -1] + 1  # (B,) every row's next position (padding is on the left)

    def pick(logits):
        if vocab_limit is not None and vocab_limit < logits.shape[-1]:
            logits[:, vocab_limit:] = float("-inf")
        token = sample(logits, params, generator, seen)
        if seen is not None:
            seen[rows, token] = True
        return token, token.tolist()  # tolist() waits for the device, so the timings below are real

    start = time.perf_counter()
    token, ids = pick(prefill(model, cache, tokens, positions))
    stats.prefill_s = time.perf_counter() - start
    for step in range(max_new_tokens):
        stats.new_tokens += 1
        yield ids
        if step + 1 == max_new_tokens:
            return
        start = time.perf_counter()
        token, ids = pick(decode_one_token(model, cache, token, next_pos + step))
        stats.decode_s += time.perf_counter() - start
        stats.decode_steps += 1


# ---- text out: incremental decoding and stop strings ---------------------------------------------------------


class IncrementalDecoder:
    """Token ids in, text out, never splitting a character.

    Each piece is the difference between decoding a short window of recent ids with and without the new ones. The
    window starts at the previous piece's first id, so the tokenizer sees some context (sentencepiece may treat
    the first piece of a sequence specially). Text is held back while it ends in U+FFFD: a character spread over
    several byte-fallback pieces (<0xE4><0xBB><0x8A>: Chinese, emoji) decodes to replacement characters until its
    last byte arrives. `flush` returns whatever is left at the end, broken bytes included.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self._prefix = 0  # first id of the decoding window
        self._read = 0  # ids before this one are already text

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        return self._advance(final=False)

    def flush(self) -> str:
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        if self._read == len(self.ids):
            return ""
        done = self.tokenizer.decode(self.ids[self._prefix:self._read])
        text = self.tokenizer.decode(self.ids[self._prefix:])
        if not final and (text.endswith(REPLACEMENT) or not text.startswith(done)):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done):]


def find_stop(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where `text` is cut: the start of the stop string that is complete first (the longest of those completed by
    the same character), or None. A stream that checks as text arrives cuts at the same place."""
    best = None
    for s in stop_strings:
        i = text.find(s)
        if i >= 0 and (best is None or (i + len(s), i) < (best[0], best[1])):
            best = (i + len(s), i)
    return None if best is None else best[1]


def cut_at_stop(text: str, stop_strings: Sequence[str] = ()) -> str:
    """`text` up to (not including) its first stop string."""
    cut = find_stop(text, stop_strings)
    return text if cut is None else text[:cut]


def _stop_prefix_len(text: str, stop_strings: Sequence[str]) -> int:
    """Length of the longest end of `text` that could be the start of a stop string."""
    held = 0
    for s in stop_strings:
        for k in range(min(len(s) - 1, len(text)), held, -1):
            if text.endswith(s[:k]):
                held = k
                break
    return held


class TextStream:
    """Token ids in, text pieces out: an IncrementalDecoder that also stops at stop strings.

    Text that could be the start of a stop string is held back until it is known not to be one, so a stream never
    shows any part of the stop string. `text` is everything released so far; `stopped` turns True when a stop
    string completes (its token is the last one that counts).
    """

    def __init__(self, tokenizer, stop_strings: Sequence[str] = ()):
        self._decoder = IncrementalDecoder(tokenizer)
        self.stop_strings = check_stop_strings(stop_strings)
        self._pending = ""
        self.text = ""
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self._pending += self._decoder.push(token)
        return self._release(final=False)

    def finish(self) -> str:
        """The held-back rest, once no more tokens will come."""
        if self.stopped:
            return ""
        self._pending += self._decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        cut = find_stop(self._pending, self.stop_strings)
        if cut is not None:
            out, self._pending, self.stopped = self._pending[:cut], "", True
        else:
            keep = 0 if final else _stop_prefix_len(self._pending, self.stop_strings)
            out = self._pending[:len(self._pending) - keep]
            self._pending = self._pending[len(out):]
        self.text += out
        return out


# ---- generate ----------------------------------------------------------------------------------------------------


def check_prompt(prompt, vocab: int, context: int | None = None, *, name: str = "a prompt",
                 empty: str = "a prompt must be a non-empty list of token ids",
                 room: str = "the context") -> list[int]:
    """`prompt` (ids in a list, tuple or tensor) as a list, or a GemmaError: it is empty (the message `empty`),
    holds anything but ids in [0, vocab) (naming it as `name`), or, with `context`, leaves no room for a new token
    in `room` (`check_room`). The prompt checks of `generate` and the engine, each in its own words."""
    if isinstance(prompt, torch.Tensor):
        prompt = prompt.tolist()
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise GemmaError(empty)
    if any(isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < vocab for i in prompt):
        raise GemmaError(f"{name} holds something other than token ids in [0, {vocab})")
    if context is not None:
        check_room(len(prompt), context, room)
    return list(prompt)


def check_room(length: int, context: int, room: str = "the context") -> None:
    """A GemmaError if a prompt of `length` tokens leaves no column of `context` for a new token."""
    if length >= context:
        raise GemmaError(f"a prompt of {length} tokens leaves no room in {room} of {context}")


def _check_prompts(prompts, vocab: int) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist()
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(
            isinstance(p, (list, tuple)) for p in prompts):
        raise GemmaError("prompts must be a non-empty list of token-id lists")
    return [check_prompt(p, vocab, name=f"prompt {n}", empty=f"prompt {n} is empty") for n, p in enumerate(prompts)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of prompts of any lengths: (tokens, positions), both (B, longest), each prompt at the right end
    of its row; the padding on the left holds `pad_id` at position -1, which attention masks out."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p):] = torch.tensor(p)
        positions[b, width - len(p):] = torch.arange(len(p))
    return tokens.to(device), positions.to(device)


def new_generator(seed: int | None, device) -> torch.Generator:
    """A private RNG: seeded for reproducible sampling; otherwise seeded from the OS, never from the global RNG."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g


def _no_steps() -> Iterator[list[int]]:
    yield from ()


def _start(model, tokenizer, prompts, params: SamplingParams, stop_ids, stats):
    """Shared set-up of `generate` and `stream_generate`: left-pad the batch into one cache and start stepping."""
    cfg, device = model.config, model.device
    prompts = _check_prompts(prompts, cfg.vocab_size)
    width = max(len(p) for p in prompts)
    check_room(width, cfg.max_seq_len, "the model's context")
    # Generation ends at the context's end, as it ends at max_new_tokens.
    max_new_tokens = min(params.max_new_tokens, cfg.max_seq_len - width)
    stops = frozenset(tokenizer.stop_ids if stop_ids is None else stop_ids)
    if max_new_tokens == 0:
        return _no_steps(), stops

    tokens, positions = left_pad(prompts, tokenizer.pad_id, device)
    seen = seen_mask(prompts, cfg.vocab_size, device) if params.repetition_penalty != 1.0 else None
    cache = model.new_cache(len(prompts), width + max_new_tokens)
    steps = decode_steps(model, cache, tokens, positions, max_new_tokens, params, new_generator(params.seed, device),
                         seen, tokenizer.vocab_size, stats)
    return steps, stops


def generate(model, tokenizer, prompts, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
             seed: int | None = None, *, stop_ids: Sequence[int] | None = None,
             stop_strings: Sequence[str] | None = None, stats: GenerationStats | None = None,
             params: SamplingParams | None = None) -> list[list[int]]:
    """The new token ids of each prompt (one batch, left-padded; prompts may differ in length).

    Each row stops after `max_new_tokens`, at the model's context end, or at a stop id (`stop_ids`, by default the
    tokenizer's `<eos>` and `<end_of_turn>`; not included), or once its text contains one of `stop_strings` (the
    ids then run up to the token that completed it; `decode_text` cuts the text there). `seed` makes sampling
    reproducible; temperature 0 is greedy. `params` (a SamplingParams) may carry all the settings instead.
    """
    params = sampling_params(params, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                             stop_strings=stop_strings)
    steps, stops = _start(model, tokenizer, prompts, params, stop_ids, stats)
    B = len(prompts)
    out: list[list[int]] = [[] for _ in range(B)]
    done = [False] * B
    streams = [TextStream(tokenizer, params.stop_strings) for _ in range(B)] if params.stop_strings else None
    try:
        for ids in steps:
            for b, t in enumerate(ids):
                if done[b]:
                    continue
                if t in stops:
                    done[b] = True
                    continue
                out[b].append(t)
                if streams is not None:
                    streams[b].push(t)
                    done[b] = streams[b].stopped
            if all(done):
                break
    finally:
        steps.close()
    return out


def decode_text(tokenizer, ids: Sequence[int], stop_strings: Sequence[str] | None = None) -> str:
    """The text of generated ids, cut before the first stop string: what `stream_generate` yields in pieces."""
    return cut_at_stop(tokenizer.decode(list(ids)), check_stop_strings(stop_strings))


def stream_generate(model, tokenizer, prompt: Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, min_p: float | None = None,
                    repetition_penalty: float = 1.0, seed: int | None = None, *,
                    stop_ids: Sequence[int] | None = None, stop_strings: Sequence[str] | None = None,
                    stats: GenerationStats | None = None, params: SamplingParams | None = None) -> Iterator[str]:
    """`generate` for one prompt, yielding text as it is produced. No piece splits a character, and the pieces
    join to `decode_text(tokenizer, generate(...)[0], stop_strings)` for the same settings. Settings are checked
    at the call, before the first piece is asked for."""
    params = sampling_params(params, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                             stop_strings=stop_strings)
    steps, stops = _start(model, tokenizer, [prompt], params, stop_ids, stats)
    return _stream_text(steps, stops, TextStream(tokenizer, params.stop_strings))


def _stream_text(steps: Iterator[list[int]], stops: frozenset[int], stream: TextStream,
                 on_token: Callable[[int], None] | None = None) -> Iterator[str]:
    """Text pieces of a batch-of-one generation, up to a stop id or stop string."""
    try:
        for (t,) in steps:
            if t in stops:
                break
            if on_token is not None:
                on_token(t)
            piece = stream.push(t)
            if piece:
                yield piece
            if stream.stopped:
                break
        piece = stream.finish()
        if piece:
            yield piece
    finally:
        steps.close()


# ---- multi-turn chat --------------------------------------------------------------------------------------------


class ChatSession:
    """A conversation that keeps its KV cache between turns, so each turn prefills only its new tokens.

    `tokens` is the conversation as the model sees it: the ids it actually generated (not a re-encoding of their
    text), joined by the template's turn markers. The cache holds `tokens[:cache.length]`; the next turn feeds the
    rest. When a turn would not fit in `max_len` with room for `max_new_tokens`, the oldest turns are dropped
    (the system prompt stays), the conversation is encoded afresh and prefilled again, and `notify` says so.
    With `raw`, there is no template: each message continues the text, and the oldest tokens are dropped instead.
    """

    def __init__(self, model, tokenizer, *, max_len: int | None = None, system: str | None = None,
                 raw: bool = False, max_new_tokens: int = 256, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, min_p: float | None = None, repetition_penalty: float = 1.0,
                 seed: int | None = None, stop_strings: Sequence[str] | None = None,
                 notify: Callable[[str], None] | None = None, params: SamplingParams | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.params = sampling_params(params, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                                      top_p=top_p, min_p=min_p, repetition_penalty=repetition_penalty, seed=seed,
                                      stop_strings=stop_strings)
        check_settings(max_new_tokens=self.params.max_new_tokens, min_new_tokens=1)  # a reply has a token at least
        self.max_len = max_len or min(model.config.max_seq_len, 8192)
        if self.params.max_new_tokens >= self.max_len:
            raise GemmaError(f"max_new_tokens ({self.params.max_new_tokens}) leaves no room for a prompt in the "
                             f"context of {self.max_len} tokens")
        self.raw = raw
        self.system = [{"role": "system", "content": system}] if system else []
        if system and raw:
            raise GemmaError("a system prompt needs the chat template (not --raw)")
        self.notify = notify or (lambda message: None)
        self.cache = model.new_cache(1, self.max_len)
        self.generator = new_generator(self.params.seed, model.device)
        self.tokens: list[int] = []
        self.messages: list[dict] = []  # the user and model turns kept, as text (for re-encoding after a drop)
        self.last_prefill = 0  # tokens the latest turn fed to the model before its reply
        self.stats = GenerationStats()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays) and restart the seeded RNG."""
        self.cache.reset()
        self.tokens, self.messages = [], []
        self.generator = new_generator(self.params.seed, self.model.device)

    def send(self, text: str) -> Iterator[str]:
        """Add a user message and return an iterator over the reply's text. Closing it early (Ctrl-C) keeps the
        reply so far. A message that cannot fit the context, or that is not text (a lone surrogate: bytes that were
        not UTF-8), raises GemmaError here, before anything changes."""
        if has_lone_surrogate(text):
            raise GemmaError("the message is not valid text (it holds bytes that are not UTF-8, or a lone "
                             "surrogate); nothing was sent")
        new = self._turn_tokens(text)
        if len(self.tokens) + len(new) + self.params.max_new_tokens > self.max_len:
            new = self._drop_oldest(text)
        self.tokens += new
        feed = self.tokens[self.cache.length:]
        self.last_prefill = len(feed)
        start, device = self.cache.length, self.model.device
        seen = (seen_mask([self.tokens], self.model.config.vocab_size, device)
                if self.params.repetition_penalty != 1.0 else None)
        self.stats = GenerationStats()
        steps = decode_steps(self.model, self.cache, torch.tensor([feed], device=device),
                             torch.arange(start, start + len(feed), device=device)[None], self.params.max_new_tokens,
                             self.params, self.generator, seen, self.tokenizer.vocab_size, self.stats)
        return self._reply(text, steps)

    def _reply(self, text: str, steps: Iterator[list[int]]) -> Iterator[str]:
        stream = TextStream(self.tokenizer, self.params.stop_strings)
        try:
            yield from _stream_text(steps, frozenset(self.tokenizer.stop_ids), stream, self.tokens.append)
        except KeyboardInterrupt:
            # Interrupted inside a forward pass: some layers may hold the new column and some not. Start the cache
            # afresh; the next turn prefills the whole conversation.
            self.cache.reset()
            raise
        finally:
            steps.close()
            if not self.raw:
                self.messages += [{"role": "user", "content": text}, {"role": "model", "content": stream.text}]

    def _turn_tokens(self, text: str) -> list[int]:
        """The ids that follow `tokens` for a new user message."""
        tok = self.tokenizer
        if self.raw:
            return tok.encode(text, bos=not self.tokens)
        user = {"role": "user", "content": text}
        if not self.tokens:
            return tok.apply_chat(self.system + self.messages + [user])
        # The template only appends, so the new turn is the difference of two renderings; it follows the model's
        # own ids after the markers that close a model turn (from the last <end_of_turn> on).
        before = tok.apply_chat(self.system + self.messages, add_generation_prompt=False)
        after = tok.apply_chat(self.system + self.messages + [user])
        close = before[len(before) - 1 - before[::-1].index(tok.end_of_turn_id):]
        return close + after[len(before):]

    def _drop_oldest(self, text: str) -> list[int]:
        """Make the conversation fit: drop the oldest turns (raw: the oldest tokens after <bos>) and start the
        cache afresh; returns the whole conversation's ids."""
        room = self.max_len - self.params.max_new_tokens
        if self.raw:
            everything = self.tokens + self.tokenizer.encode(text, bos=not self.tokens)
            dropped = len(everything) - room
            ids = everything[:1] + everything[1 + dropped:]  # keep <bos>
            what = f"{dropped} token{'s' * (dropped != 1)}"
        else:
            user = {"role": "user", "content": text}
            kept = self.messages[2:]  # the oldest turn goes at least, then more until the rest fits
            while True:
                ids = self.tokenizer.apply_chat(self.system + kept + [user])
                if len(ids) <= room:
                    break
                if not kept:
                    raise GemmaError(f"the message ({len(ids)} tokens) and max_new_tokens "
                                     f"({self.params.max_new_tokens}) do not fit the context of {self.max_len} tokens")
                kept = kept[2:]  # one user turn and its reply
            dropped = (len(self.messages) - len(kept)) // 2
            self.messages = kept
            what = f"{dropped} turn{'s' * (dropped != 1)}"
        self.cache.reset()
        self.tokens = []
        self.notify(f"dropped the oldest {what} to fit the context of {self.max_len} tokens")
        return ids
