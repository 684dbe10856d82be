"""The two vocabulary files a Gemma tokenizer comes in, behind one small interface that `Tokenizer` uses:

- `SentencePieceVocab`: a sentencepiece `tokenizer.model` (Gemma 1-3, and GGUF vocabularies rebuilt as one);
- `JsonVocab`: a `tokenizer.json` of the `tokenizers` library (Gemma 4's hub repos ship only this: BPE with byte
  fallback), read with that library, which is what transformers' Gemma tokenizer runs.

Each gives `encode(text)` (markers in the text become their ids, as the reference tokenizer does), `encode_text(text)`
(what a message's content is: a marker literal in it stays text, so a user cannot forge a turn), `decode(ids)`,
`token_id(piece)` / `piece(id)`, `size` and `files` (the file name and bytes that reproduce it).
"""

from __future__ import annotations

import re

import sentencepiece as spm

from gemma.errors import GemmaError

JSON_FILE = "tokenizer.json"
_BYTE_PIECE = re.compile(r"<0x[0-9A-F]{2}>")  # a byte-fallback piece, as both formats name them
MODEL_FILE = "tokenizer.model"


def _lone_surrogate_error(text: str) -> GemmaError | None:
    lone = next((ch for ch in text if 0xD800 <= ord(ch) <= 0xDFFF), None)
    if lone is None:
        return None
    return GemmaError(
        f"text holds a lone surrogate (U+{ord(lone):04X}), which is not valid Unicode and cannot be tokenized"
    )


class _Guarded:
    """`encode_text` for both vocabularies: the marker pieces that `_plain` (the vocabulary's encoding of text)
    would still match in raw text are cut apart: each literal is cut off from its surroundings and its first
    character encoded apart from the rest, which cannot match the piece; decode still returns the exact text."""

    _guard = None

    def _plain(self, text: str) -> list[int]:
        raise NotImplementedError

    def guard(self, markers: list[int]) -> None:
        """Keep the pieces of `markers` out of `encode_text` (only those `_plain` would match)."""
        pieces = {self.piece(i) for i in markers}
        pieces = [p for p in pieces if p and self._plain(p) == [self.token_id(p)]]
        pieces.sort(key=len, reverse=True)  # a marker containing another is split as a whole
        self._guard = re.compile("|".join(map(re.escape, pieces))) if pieces else None

    def encode_text(self, text: str) -> list[int]:
        if self._guard is None:
            return self._plain(text)
        ids, pos = [], 0
        for match in self._guard.finditer(text):
            ids += self._plain(text[pos : match.start()])
            literal = match.group()
            ids += self._plain(literal[0]) + self.encode_text(literal[1:])
            pos = match.end()
        return ids + self._plain(text[pos:])


class SentencePieceVocab(_Guarded):
    """A sentencepiece model. Its user-defined pieces (Gemma's chat markers) match anywhere in raw text; control
    pieces (<bos>, <eos>, <pad>) never do and decode to nothing."""

    def __init__(self, model_proto: bytes, where: str):
        # sentencepiece accepts empty bytes as a model with no pieces and then logs errors on every call.
        if not model_proto:
            raise GemmaError(f"{where}: empty file, not a sentencepiece model")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            raise GemmaError(f"{where}: not a valid sentencepiece model (corrupt or wrong file type)") from None
        if self._sp.get_piece_size() == 0:
            raise GemmaError(f"{where}: sentencepiece model has no pieces")

    @property
    def size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def files(self) -> dict[str, bytes]:
        return {MODEL_FILE: self._sp.serialized_model_proto()}

    def declared(self, name: str) -> int | None:
        """The id the model file declares for bos, eos or pad (None: it declares none)."""
        i = {"bos": self._sp.bos_id, "eos": self._sp.eos_id, "pad": self._sp.pad_id}[name]()
        return i if i >= 0 else None

    def token_id(self, piece: str) -> int | None:
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk_id for an unknown piece, so check the piece really is there.
        return i if self._sp.id_to_piece(i) == piece else None

    def piece(self, i: int) -> str:
        return self._sp.id_to_piece(i)

    def is_byte(self, i: int) -> bool:
        return self._sp.is_byte(i)

    def encode(self, text: str) -> list[int]:
        """sentencepiece's encoding; text it cannot take (a lone surrogate, which has no UTF-8 form) is a
        GemmaError."""
        try:
            return self._sp.encode(text)
        except (RuntimeError, UnicodeEncodeError):
            error = _lone_surrogate_error(text)
            if error is None:
                raise
            raise error from None

    _plain = encode  # user-defined pieces match anywhere in raw text: the guard cuts the markers apart

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(ids)


class JsonVocab(_Guarded):
    """A `tokenizer.json`, run by the `tokenizers` library as transformers runs it: its added tokens are matched in
    raw text first (special or not), the rest goes through its normalizer and BPE. For message content a second
    copy treats the special ones as plain text (`encode_special_tokens`), so a marker literal cannot forge a turn;
    the non-special ones still match as transformers matches them."""

    def __init__(self, raw: bytes, where: str):
        try:
            import tokenizers
        except ImportError:
            raise GemmaError(
                f"{where}: reading tokenizer.json needs the tokenizers package (pip install tokenizers)"
            ) from None
        try:
            text = raw.decode("utf-8")
            self._tok = tokenizers.Tokenizer.from_str(text)
            self._text = tokenizers.Tokenizer.from_str(text)
        except (UnicodeDecodeError, Exception) as exc:  # the library raises plain Exceptions for a bad file
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            raise GemmaError(f"{where}: not a valid tokenizer.json ({first})") from None
        self._text.encode_special_tokens = True
        self._raw = raw
        if self.size == 0:
            raise GemmaError(f"{where}: tokenizer.json has no tokens")

    @property
    def size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def files(self) -> dict[str, bytes]:
        return {JSON_FILE: self._raw}

    def declared(self, name: str) -> int | None:
        return None  # tokenizer.json names no roles; tokenizer_config.json or the piece names do

    def token_id(self, piece: str) -> int | None:
        return self._tok.token_to_id(piece)

    def piece(self, i: int) -> str:
        return self._tok.id_to_token(i)

    def is_byte(self, i: int) -> bool:
        return bool(_BYTE_PIECE.fullmatch(self._tok.id_to_token(i) or ""))

    def _run(self, tok, text: str) -> list[int]:
        error = _lone_surrogate_error(text)
        if error is not None:
            raise error
        return tok.encode(text, add_special_tokens=False).ids

    def encode(self, text: str) -> list[int]:
        return self._run(self._tok, text)

    def _plain(self, text: str) -> list[int]:
        """Text with the special added tokens not matched (a marker that the file does not flag special is still
        matched here, and the guard cuts it apart)."""
        return self._run(self._text, text)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)
