"""Log-probabilities in OpenAI's two shapes, from the engine's TokenLogprobs (gemma/generation/logprobs.py).

/v1/completions (the legacy shape, as vLLM writes it and lm-eval's `local-completions` reads it):
  {"tokens": [text, ...], "token_logprobs": [float | None, ...], "top_logprobs": [{text: float} | None, ...],
   "text_offset": [int, ...]}
  With `echo` the prompt's tokens come first, the first of them with None (nothing comes before it). Each
  top_logprobs dict holds the N most likely tokens and the token itself (so N + 1 at most, as OpenAI says).
  text_offset counts characters as vLLM does: each token's text starts where the previous one's ended, and the
  reply's first token where the echoed prompt's text ends.

/v1/chat/completions:
  {"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}, ...]}, ...]}

A token's text is what it decodes to alone; a token that decodes to nothing (<bos>, <eos>) is shown as its piece."""

from __future__ import annotations

from typing import Sequence

from gemma.generation.logprobs import TokenLogprob


class TokenTexts:
    """Each token's text, remembered: a reply's alternatives repeat (the same few tokens at many positions)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.seen = tokenizer, {}

    def __call__(self, token: int) -> str:
        text = self.seen.get(token)
        if text is None:
            text = self.seen[token] = self.tokenizer.decode([token]) or self.tokenizer.piece(token)
        return text


def completion_logprobs(
    tokenizer,
    prompt: Sequence[int] | None,
    prompt_scored: Sequence[TokenLogprob | None] | None,
    prompt_text_length: int,
    reply_scored: Sequence[TokenLogprob],
) -> dict:
    """The legacy `logprobs` object: the echoed `prompt`'s tokens (ids, and their entries from the engine, the
    first None) when `prompt` is given, then the reply's. `prompt_text_length` is the echoed prompt's length in
    characters (where the reply's text starts)."""
    text = TokenTexts(tokenizer)
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    offset = 0

    def add(token: int, entry: TokenLogprob | None) -> None:
        nonlocal offset
        out["tokens"].append(text(token))
        out["text_offset"].append(offset)
        offset += len(out["tokens"][-1])
        if entry is None:
            out["token_logprobs"].append(None)
            out["top_logprobs"].append(None)
            return
        out["token_logprobs"].append(entry.logprob)
        top: dict[str, float] = {}
        for alternative, logprob in entry.top:
            top.setdefault(text(alternative), logprob)  # two ids of one text: the likelier one's figure
        top.setdefault(out["tokens"][-1], entry.logprob)
        out["top_logprobs"].append(top)

    if prompt is not None:
        for token, entry in zip(prompt, prompt_scored or [None] * len(prompt)):
            add(token, entry)
        offset = prompt_text_length
    for entry in reply_scored:
        add(entry.token, entry)
    return out


def chat_logprobs(tokenizer, scored: Sequence[TokenLogprob]) -> dict:
    """The chat `logprobs` object of the reply's tokens."""
    text = TokenTexts(tokenizer)

    def item(token: int, logprob: float) -> dict:
        shown = text(token)
        if tokenizer.is_byte(token):  # a byte-fallback piece (<0xE4>): its one byte, not U+FFFD's three
            raw = [int(tokenizer.piece(token)[3:-1], 16)]
        else:
            raw = list(shown.encode("utf-8"))
        return {"token": shown, "logprob": logprob, "bytes": raw}

    return {
        "content": [
            {**item(entry.token, entry.logprob), "top_logprobs": [item(t, lp) for t, lp in entry.top]}
            for entry in scored
        ]
    }
