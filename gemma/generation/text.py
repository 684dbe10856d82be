"""Text out: ids decoded incrementally, never splitting a character (`IncrementalDecoder`), and stopped at stop
strings (`TextStream`, `decode_text`)."""

from __future__ import annotations

from typing import Sequence

from gemma.generation.sampling import check_stop_strings

REPLACEMENT = "\ufffd"  # what sentencepiece decodes an incomplete UTF-8 byte sequence to


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
        done = self.tokenizer.decode(self.ids[self._prefix : self._read])
        text = self.tokenizer.decode(self.ids[self._prefix :])
        if not final and (text.endswith(REPLACEMENT) or not text.startswith(done)):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(done) :]


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
            out = self._pending[: len(self._pending) - keep]
            self._pending = self._pending[len(out) :]
        self.text += out
        return out


def decode_text(tokenizer, ids: Sequence[int], stop_strings: Sequence[str] | None = None) -> str:
    """The text of generated ids, cut before the first stop string: what `stream_generate` yields in pieces."""
    return cut_at_stop(tokenizer.decode(list(ids)), check_stop_strings(stop_strings))
