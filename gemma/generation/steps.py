"""The model steps of every generation: `prefill`, `decode_one_token`, and `decode_steps`, the loop that samples
one token per row per step with the KV cache; `new_generator`, the private RNG each generation draws from."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator

import torch

from gemma.generation.sampling import SamplingParams, sample


def prefill(model, cache, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Feed `tokens` (B, T) at `positions` (B, T; -1 marks left padding) into `cache`; return the logits (B, V)
    of the last column, the only ones generation needs (the output head is the largest matmul)."""
    with torch.no_grad():
        h = model.hidden_states(tokens, positions, cache=cache, last_only=True)  # (B, 1, hidden)
        return model.logits(h)[:, 0]


def decode_one_token(model, cache, token: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """Feed one token per row, (B,) at (B,) positions; return the next logits (B, V). A compiled model
    (gemma.model.compiled) takes its compiled step."""
    compiled = getattr(model, "decode_step", None)
    if compiled is not None:
        return compiled.step(cache, token, position)
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
        return (
            f"prefill {self.prompt_tokens} tokens in {self.prefill_s:.2f}s "
            f"({self.prefill_tokens_per_s:.1f} tokens/s), decode {self.new_tokens} tokens "
            f"({self.decode_tokens_per_s:.1f} tokens/s)"
        )


def decode_steps(
    model,
    cache,
    tokens: torch.Tensor,
    positions: torch.Tensor,
    max_new_tokens: int,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    seen: torch.Tensor | None = None,
    vocab_limit: int | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[list[int]]:
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


def new_generator(seed: int | None, device) -> torch.Generator:
    """A private RNG: seeded for reproducible sampling; otherwise seeded from the OS, never from the global RNG."""
    g = torch.Generator(device=device)
    if seed is None:
        g.seed()
    else:
        g.manual_seed(seed)
    return g
