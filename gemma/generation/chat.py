"""A multi-turn chat that keeps its KV cache between turns."""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from gemma.errors import GemmaError
from gemma.files import has_lone_surrogate
from gemma.generation.batch import stream_text
from gemma.generation.sampling import SamplingParams, check_settings, sampling_params, seen_mask
from gemma.generation.steps import GenerationStats, decode_steps, new_generator
from gemma.generation.text import TextStream


class ChatSession:
    """A conversation that keeps its KV cache between turns, so each turn prefills only its new tokens.

    `tokens` is the conversation as the model sees it: the ids it actually generated (not a re-encoding of their
    text), joined by the template's turn markers. The cache holds `tokens[:cache.length]`; the next turn feeds the
    rest. When a turn would not fit in `max_len` with room for `max_new_tokens`, the oldest turns are dropped
    (the system prompt stays), the conversation is encoded afresh and prefilled again, and `notify` says so.
    With `raw`, there is no template: each message continues the text, and the oldest tokens are dropped instead.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_len: int | None = None,
        system: str | None = None,
        raw: bool = False,
        max_new_tokens: int = 256,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        min_p: float | None = None,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop_strings: Sequence[str] | None = None,
        notify: Callable[[str], None] | None = None,
        params: SamplingParams | None = None,
        enable_thinking: bool = False,
    ):
        self.model, self.tokenizer = model, tokenizer
        # Gemma 4's thinking mode: each reply may start with a thought, which the template drops from the history;
        # so after such a reply the conversation is encoded afresh (without it) instead of extending the cache.
        self.enable_thinking = enable_thinking
        if enable_thinking and (raw or getattr(tokenizer, "chat_format", 3) != 4):
            raise GemmaError("thinking needs a Gemma 4 model and its chat template (not --raw)")
        self._reencode = False
        self.params = sampling_params(
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
        check_settings(max_new_tokens=self.params.max_new_tokens, min_new_tokens=1)  # a reply has a token at least
        self.max_len = max_len or min(model.config.max_seq_len, 8192)
        if self.params.max_new_tokens >= self.max_len:
            raise GemmaError(
                f"max_new_tokens ({self.params.max_new_tokens}) leaves no room for a prompt in the "
                f"context of {self.max_len} tokens"
            )
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
            raise GemmaError(
                "the message is not valid text (it holds bytes that are not UTF-8, or a lone "
                "surrogate); nothing was sent"
            )
        if self._reencode:  # the last reply thought: the history is rendered without its thought
            self.cache.reset()
            self.tokens, self._reencode = [], False
        new = self._turn_tokens(text)
        if len(self.tokens) + len(new) + self.params.max_new_tokens > self.max_len:
            new = self._drop_oldest(text)
        self.tokens += new
        feed = self.tokens[self.cache.length :]
        self.last_prefill = len(feed)
        start, device = self.cache.length, self.model.device
        seen = (
            seen_mask([self.tokens], self.model.config.vocab_size, device)
            if self.params.repetition_penalty != 1.0
            else None
        )
        self.stats = GenerationStats()
        steps = decode_steps(
            self.model,
            self.cache,
            torch.tensor([feed], device=device),
            torch.arange(start, start + len(feed), device=device)[None],
            self.params.max_new_tokens,
            self.params,
            self.generator,
            seen,
            self.tokenizer.vocab_size,
            self.stats,
        )
        return self._reply(text, steps)

    def _reply(self, text: str, steps: Iterator[list[int]]) -> Iterator[str]:
        stream = TextStream(self.tokenizer, self.params.stop_strings)
        try:
            yield from stream_text(steps, frozenset(self.tokenizer.stop_ids), stream, self.tokens.append)
        except KeyboardInterrupt:
            # Interrupted inside a forward pass: some layers may hold the new column and some not. Start the cache
            # afresh; the next turn prefills the whole conversation.
            self.cache.reset()
            raise
        finally:
            steps.close()
            if not self.raw:
                self.messages += [{"role": "user", "content": text}, {"role": "model", "content": stream.text}]
                self._reencode = self.enable_thinking

    def _turn_tokens(self, text: str) -> list[int]:
        """The ids that follow `tokens` for a new user message."""
        tok = self.tokenizer
        if self.raw:
            return tok.encode(text, bos=not self.tokens)
        user = {"role": "user", "content": text}
        thinking = {"enable_thinking": True} if self.enable_thinking else {}
        if not self.tokens:
            return tok.apply_chat(self.system + self.messages + [user], **thinking)
        # The template only appends, so the new turn is the difference of two renderings; it follows the model's
        # own ids after the markers that close a model turn (from the last <end_of_turn> on).
        before = tok.apply_chat(self.system + self.messages, add_generation_prompt=False, **thinking)
        after = tok.apply_chat(self.system + self.messages + [user], **thinking)
        close = before[len(before) - 1 - before[::-1].index(tok.end_of_turn_id) :]
        return close + after[len(before) :]

    def _drop_oldest(self, text: str) -> list[int]:
        """Make the conversation fit: drop the oldest turns (raw: the oldest tokens after <bos>) and start the
        cache afresh; returns the whole conversation's ids."""
        room = self.max_len - self.params.max_new_tokens
        if self.raw:
            everything = self.tokens + self.tokenizer.encode(text, bos=not self.tokens)
            dropped = len(everything) - room
            ids = everything[:1] + everything[1 + dropped :]  # keep <bos>
            what = f"{dropped} token{'s' * (dropped != 1)}"
        else:
            user = {"role": "user", "content": text}
            kept = self.messages[2:]  # the oldest turn goes at least, then more until the rest fits
            while True:
                thinking = {"enable_thinking": True} if self.enable_thinking else {}
                ids = self.tokenizer.apply_chat(self.system + kept + [user], **thinking)
                if len(ids) <= room:
                    break
                if not kept:
                    raise GemmaError(
                        f"the message ({len(ids)} tokens) and max_new_tokens "
                        f"({self.params.max_new_tokens}) do not fit the context of {self.max_len} tokens"
                    )
                kept = kept[2:]  # one user turn and its reply
            dropped = (len(self.messages) - len(kept)) // 2
            self.messages = kept
            what = f"{dropped} turn{'s' * (dropped != 1)}"
        self.cache.reset()
        self.tokens = []
        self.notify(f"dropped the oldest {what} to fit the context of {self.max_len} tokens")
        return ids
