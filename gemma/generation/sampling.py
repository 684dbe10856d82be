"""Sampling settings and filters: `SamplingParams` (every setting of a generation, checked once), the filters
as small pure functions and `sample`.

The filters follow transformers' definitions and order (repetition penalty, then temperature, top-k, top-p,
min-p), so a setting means here what it means there. Each works on float32 logits (B, V) and costs O(V) per step;
only top-p sorts the vocabulary, and only when it is on.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from gemma.errors import GemmaError


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


def check_settings(
    temperature=0.0,
    top_k=None,
    top_p=None,
    min_p=None,
    repetition_penalty=1.0,
    max_new_tokens=None,
    seed=None,
    *,
    min_new_tokens: int = 0,
    spell: Callable[[str], str] = str,
) -> None:
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
        refuse(
            "repetition_penalty",
            f"in [{_FLOAT32.tiny:.3g}, {_FLOAT32.max:.3g}] (float32's normal numbers)",
            repetition_penalty,
        )
    if max_new_tokens is not None and (not _integer(max_new_tokens) or max_new_tokens < min_new_tokens):
        refuse(
            "max_new_tokens",
            "a positive integer" if min_new_tokens == 1 else f"an integer >= {min_new_tokens}",
            max_new_tokens,
        )
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
        check_settings(
            self.temperature,
            self.top_k,
            self.top_p,
            self.min_p,
            self.repetition_penalty,
            self.max_new_tokens,
            self.seed,
        )
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


def sample(
    logits: torch.Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
) -> torch.Tensor:
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
