"""`generate` (a batch of prompts, left-padded into one cache) and `stream_generate` (one prompt, as text while it
is produced), and the prompt checks and padding the engine shares with them."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from gemma.errors import GemmaError
from gemma.generation.sampling import SamplingParams, sampling_params, seen_mask
from gemma.generation.steps import GenerationStats, decode_steps, new_generator
from gemma.generation.text import TextStream


def check_prompt(
    prompt,
    vocab: int,
    context: int | None = None,
    *,
    name: str = "a prompt",
    empty: str = "a prompt must be a non-empty list of token ids",
    room: str = "the context",
) -> list[int]:
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
    if not isinstance(prompts, (list, tuple)) or not prompts or not all(isinstance(p, (list, tuple)) for p in prompts):
        raise GemmaError("prompts must be a non-empty list of token-id lists")
    return [check_prompt(p, vocab, name=f"prompt {n}", empty=f"prompt {n} is empty") for n, p in enumerate(prompts)]


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch of prompts of any lengths: (tokens, positions), both (B, longest), each prompt at the right end
    of its row; the padding on the left holds `pad_id` at position -1, which attention masks out."""
    width = max(len(p) for p in prompts)
    tokens = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    positions = torch.full((len(prompts), width), -1, dtype=torch.long)
    for b, p in enumerate(prompts):
        tokens[b, width - len(p) :] = torch.tensor(p)
        positions[b, width - len(p) :] = torch.arange(len(p))
    return tokens.to(device), positions.to(device)


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
    steps = decode_steps(
        model,
        cache,
        tokens,
        positions,
        max_new_tokens,
        params,
        new_generator(params.seed, device),
        seen,
        tokenizer.vocab_size,
        stats,
    )
    return steps, stops


def generate(
    model,
    tokenizer,
    prompts,
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
    stats: GenerationStats | None = None,
    params: SamplingParams | None = None,
) -> list[list[int]]:
    """The new token ids of each prompt (one batch, left-padded; prompts may differ in length).

    Each row stops after `max_new_tokens`, at the model's context end, or at a stop id (`stop_ids`, by default the
    tokenizer's `<eos>` and `<end_of_turn>`; not included), or once its text contains one of `stop_strings` (the
    ids then run up to the token that completed it; `decode_text` cuts the text there). `seed` makes sampling
    reproducible; temperature 0 is greedy. `params` (a SamplingParams) may carry all the settings instead.
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


def stream_generate(
    model,
    tokenizer,
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
    stats: GenerationStats | None = None,
    params: SamplingParams | None = None,
) -> Iterator[str]:
    """`generate` for one prompt, yielding text as it is produced. No piece splits a character, and the pieces
    join to `decode_text(tokenizer, generate(...)[0], stop_strings)` for the same settings. Settings are checked
    at the call, before the first piece is asked for."""
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
    steps, stops = _start(model, tokenizer, [prompt], params, stop_ids, stats)
    return stream_text(steps, stops, TextStream(tokenizer, params.stop_strings))


def stream_text(
    steps: Iterator[list[int]], stops: frozenset[int], stream: TextStream, on_token: Callable[[int], None] | None = None
) -> Iterator[str]:
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
