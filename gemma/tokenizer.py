"""Gemma's sentencepiece tokenizer and its chat template.

Every special id is read from the model file: Gemma 1/2 and Gemma 3 number their chat markers differently, so none
is hard-coded. `apply_chat` reproduces, id for id, what transformers gives when it renders Gemma 3's official chat
template and tokenizes the string, except that message content can never produce a chat marker (see `encode_content`).
"""

import os
import re
from collections.abc import Mapping
from pathlib import Path

import sentencepiece as spm

from gemma.errors import GemmaError
from gemma.files import read_bytes
from gemma.writing import write_atomically

_ROLES = ("user", "model", "assistant", "system")


class Tokenizer:
    """A sentencepiece model plus the ids Gemma's chat format needs."""

    def __init__(self, path):
        path = os.fspath(path)
        # A folder, FIFO or device (/dev/zero) where the file belongs is a one-line error, not a read without end.
        self._init(read_bytes(path, "tokenizer file"), path)

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
        """Build from a serialized sentencepiece `ModelProto` (e.g. one rebuilt from a GGUF file)."""
        tok = cls.__new__(cls)
        tok._init(bytes(model_proto), "tokenizer model")
        return tok

    def _init(self, model_proto: bytes, where: str):
        self._where = where
        # sentencepiece accepts empty bytes as a model with no pieces and then logs errors on every call.
        if not model_proto:
            raise GemmaError(f"{where}: empty file, not a sentencepiece model")
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except RuntimeError:
            raise GemmaError(f"{where}: not a valid sentencepiece model (corrupt or wrong file type)") from None
        if self._sp.get_piece_size() == 0:
            raise GemmaError(f"{where}: sentencepiece model has no pieces")

        self._bos_id = self._special_id(self._sp.bos_id(), "<bos>")
        self._eos_id = self._special_id(self._sp.eos_id(), "<eos>")
        self._pad_id = self._special_id(self._sp.pad_id(), "<pad>")
        for name, value in (("<bos>", self._bos_id), ("<eos>", self._eos_id), ("<pad>", self._pad_id)):
            if value is None:
                raise GemmaError(f"{where}: tokenizer has no {name} piece; not a Gemma tokenizer")
        self._start_id = self._special_id(-1, "<start_of_turn>")
        self._end_id = self._special_id(-1, "<end_of_turn>")

        # Marker pieces that sentencepiece would match if they appeared in raw text (user-defined pieces; control
        # pieces such as Gemma's <bos> never match). Message content must not be able to produce them.
        markers = (self._bos_id, self._eos_id, self._pad_id, self._start_id, self._end_id)
        guarded = {self._sp.id_to_piece(i) for i in markers if i is not None}
        guarded = [p for p in guarded if self._sp.encode(p) == [self._sp.piece_to_id(p)]]
        # Longest first, so that a marker containing another is split as a whole.
        guarded.sort(key=len, reverse=True)
        self._guard = re.compile("|".join(map(re.escape, guarded))) if guarded else None

    def _special_id(self, spm_id: int, piece: str) -> int | None:
        """The id sentencepiece reports, else the id of `piece` if the vocabulary has it, else None."""
        if spm_id >= 0:
            return spm_id
        i = self._sp.piece_to_id(piece)
        # piece_to_id answers unk_id for an unknown piece, so check the piece really is there.
        return i if self._sp.id_to_piece(i) == piece else None

    # ---- the model file ----

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model."""
        return self._sp.serialized_model_proto()

    def save(self, path):
        """Write the model file atomically (gemma.writing: a temporary file beside it, renamed into place) into a
        folder that exists."""
        path = Path(path)
        if not path.parent.is_dir():
            raise GemmaError(f"{path}: cannot write the tokenizer file (there is no folder {path.parent})")
        write_atomically(path, self.model_proto)

    # ---- ids ----

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def bos_id(self) -> int:
        return self._bos_id

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def pad_id(self) -> int:
        return self._pad_id

    @property
    def start_of_turn_id(self) -> int | None:
        """None when the model has no <start_of_turn> piece (then it has no chat format)."""
        return self._start_id

    @property
    def end_of_turn_id(self) -> int | None:
        return self._end_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: <eos>, and <end_of_turn> where the model has it."""
        return (self._eos_id,) if self._end_id is None else (self._eos_id, self._end_id)

    # ---- text ----

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Plain sentencepiece encoding: user-defined pieces in `text` (chat markers included) are matched."""
        if not isinstance(text, str):
            # sentencepiece would accept a list and return a list of lists.
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._encode(text)
        # Prepended by hand: sentencepiece's add_bos only works when the model declares bos_id itself.
        return [self._bos_id] + ids if bos else ids

    def _encode(self, text: str) -> list[int]:
        """sentencepiece's encoding; text it cannot take (a lone surrogate, which has no UTF-8 form) is a
        GemmaError. Callers that know where the text came from check first and name the place; this is the
        backstop."""
        try:
            return self._sp.encode(text)
        except (RuntimeError, UnicodeEncodeError):
            lone = next((ch for ch in text if 0xD800 <= ord(ch) <= 0xDFFF), None)
            if lone is None:
                raise
            raise GemmaError(
                f"text holds a lone surrogate (U+{ord(lone):04X}), which is not valid Unicode and cannot be tokenized"
            ) from None

    def decode(self, ids) -> str:
        """Text of `ids` (a list, tuple or tensor of ints). Control pieces such as <bos> decode to nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        return self._sp.decode([int(i) for i in ids])

    # ---- chat ----

    def render_chat(self, messages, add_generation_prompt: bool = True) -> str:
        """The chat template as text, as transformers renders Gemma 3's template (for debugging and tests)."""
        return "".join(
            p if isinstance(p, str) else self._sp.id_to_piece(p)
            for p in self._chat_parts(messages, add_generation_prompt)
        )

    def apply_chat(self, messages, add_generation_prompt: bool = True) -> list[int]:
        """Token ids of the chat template; message content is text and never yields a marker id."""
        ids = []
        for part in self._chat_parts(messages, add_generation_prompt):
            if isinstance(part, str):
                ids += self.encode_content(part)
            else:
                ids.append(part)
        return ids

    def _chat_parts(self, messages, add_generation_prompt: bool) -> list:
        """Gemma 3's chat template as a list of marker ids (int) and the text spans between them (str).

        Each turn is <start_of_turn>{role}\\n{content.strip()}<end_of_turn>\\n; "assistant" is written "model";
        a leading system message is prepended to the first user turn with a blank line (system text not stripped,
        as the official template does).
        """
        if self._start_id is None or self._end_id is None:
            raise GemmaError(f"{self._where}: tokenizer has no chat pieces (<start_of_turn>/<end_of_turn>)")
        if not isinstance(messages, (list, tuple)) or not messages:
            raise GemmaError("chat: messages must be a non-empty list of {role, content}")
        for i, m in enumerate(messages):
            if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
                raise GemmaError(f"chat: message {i} must be a dict with 'role' and 'content'")
            if m["role"] not in _ROLES:
                raise GemmaError(
                    f"chat: message {i} has unknown role {m['role']!r} (expected one of {', '.join(_ROLES)})"
                )
            if not isinstance(m["content"], str):
                raise GemmaError(f"chat: message {i} content must be a string, got {type(m['content']).__name__}")

        prefix, turns, first = "", list(messages), 0
        if turns[0]["role"] == "system":
            prefix, turns, first = turns[0]["content"] + "\n\n", turns[1:], 1
            if not turns:
                # The official template would drop the system text silently; refuse instead.
                raise GemmaError("chat: a system message must be followed by a user message")

        parts = [self._bos_id]
        for n, m in enumerate(turns):
            role = "model" if m["role"] == "assistant" else m["role"]
            expected = "user" if n % 2 == 0 else "model"
            if role != expected:
                raise GemmaError(
                    f"chat: message {first + n} has role {m['role']!r}, expected {expected!r} "
                    "(roles alternate user/model, starting with user, after an optional system message)"
                )
            text = (prefix if n == 0 else "") + m["content"].strip()
            # One span from the role to the end of the content: transformers tokenizes the rendered string, which
            # splits only at marker pieces, so the role, newline and content are encoded together.
            parts += [self._start_id, f"{role}\n{text}", self._end_id, "\n"]
        if add_generation_prompt:
            parts += [self._start_id, "model\n"]
        return parts

    def encode_content(self, text: str) -> list[int]:
        """Encode message content (no <bos>) so that marker literals inside it stay text.

        sentencepiece matches user-defined pieces anywhere in its input, so content holding "<end_of_turn>" would
        otherwise become the real marker and let a user forge a turn. Each such literal is cut off from its
        surroundings and its first character encoded apart from the rest, which cannot match the piece;
        decode() still returns the exact text.
        """
        if self._guard is None:
            return self._encode(text)
        ids, pos = [], 0
        for match in self._guard.finditer(text):
            ids += self._encode(text[pos : match.start()])
            literal = match.group()
            ids += self._encode(literal[0]) + self.encode_content(literal[1:])
            pos = match.end()
        return ids + self._encode(text[pos:])

    _encode_span = encode_content  # the former private name
