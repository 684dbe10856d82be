"""Gemma's tokenizer and its chat format.

A tokenizer is a vocabulary file, sentencepiece's `tokenizer.model` (Gemma 1-3) or a `tokenizer.json` (Gemma 4's hub
repos ship only this), read by gemma.tokenizer.vocab, plus the ids Gemma's chat format needs. Every special id is
read from the files (Gemma 1/2 and Gemma 3 number their chat markers differently, Gemma 4 renames them), so none is
hard-coded. `apply_chat` reproduces, id for id, what transformers gives when it renders the model's official chat
template and tokenizes the string, except that message content can never produce a marker: Gemma 1-3's format in
gemma.tokenizer.gemma3, Gemma 4's (system turn, thinking, tools) in gemma.tokenizer.gemma4.
"""

from __future__ import annotations

import os
from pathlib import Path

from gemma.errors import GemmaError
from gemma.files import read_bytes, read_json_file
from gemma.tokenizer import gemma3, gemma4
from gemma.tokenizer.vocab import JSON_FILE, MODEL_FILE, JsonVocab, SentencePieceVocab
from gemma.writing import write_atomically

__all__ = ["Tokenizer", "JSON_FILE", "MODEL_FILE"]


class Tokenizer:
    """A vocabulary plus the ids Gemma's chat format needs."""

    def __init__(self, path):
        """From a `tokenizer.model` (sentencepiece) or a `tokenizer.json` (chosen by the file name); a
        `tokenizer_config.json` beside a tokenizer.json names its bos, eos and pad tokens."""
        path = os.fspath(path)
        # A folder, FIFO or device (/dev/zero) where the file belongs is a one-line error, not a read without end.
        raw = read_bytes(path, "tokenizer file")
        if Path(path).name.endswith(".json"):
            roles = _config_roles(Path(path).parent / "tokenizer_config.json")
            self._init(JsonVocab(raw, path), path, roles)
        else:
            self._init(SentencePieceVocab(raw, path), path)

    @classmethod
    def from_bytes(cls, model_proto: bytes) -> "Tokenizer":
        """Build from a serialized sentencepiece `ModelProto` (e.g. one rebuilt from a GGUF file)."""
        tok = cls.__new__(cls)
        tok._init(SentencePieceVocab(bytes(model_proto), "tokenizer model"), "tokenizer model")
        return tok

    @classmethod
    def from_json(cls, raw: bytes, roles: dict[str, str] | None = None) -> "Tokenizer":
        """Build from the bytes of a tokenizer.json; `roles` names its bos/eos/pad tokens ({"bos": "<bos>", ...})."""
        tok = cls.__new__(cls)
        tok._init(JsonVocab(bytes(raw), "tokenizer.json"), "tokenizer.json", roles or {})
        return tok

    def _init(self, vocab, where: str, roles: dict[str, str] | None = None):
        self._vocab, self._where = vocab, where
        # Set by the folder loader when the folder ships a chat template other than the official one rendered here.
        self.template_note: str | None = None
        roles = roles or {}
        found = {}
        for name in ("bos", "eos", "pad"):
            piece = roles.get(name, f"<{name}>")
            i = vocab.declared(name) if name not in roles else None
            found[name] = i if i is not None else vocab.token_id(piece)
            if found[name] is None:
                raise GemmaError(f"{where}: tokenizer has no {piece} piece; not a Gemma tokenizer")
        self._bos_id, self._eos_id, self._pad_id = found["bos"], found["eos"], found["pad"]
        # Gemma 4 renamed the turn markers (same ids as Gemma 3's); its other markers exist only in its vocabulary.
        self._gemma4 = {p: vocab.token_id(p) for p in gemma4.MARKERS}
        self.chat_format = 4 if all(self._gemma4[p] is not None for p in ("<|turn>", "<turn|>")) else 3
        if self.chat_format == 4:
            self._start_id, self._end_id = self._gemma4["<|turn>"], self._gemma4["<turn|>"]
        else:
            self._start_id, self._end_id = vocab.token_id("<start_of_turn>"), vocab.token_id("<end_of_turn>")
        markers = [self._bos_id, self._eos_id, self._pad_id, self._start_id, self._end_id]
        markers += [i for i in self._gemma4.values() if i is not None]
        # Marker pieces that message content must not be able to produce.
        vocab.guard([i for i in markers if i is not None])

    # ---- the model file ----

    @property
    def files(self) -> dict[str, bytes]:
        """{file name: bytes} that reproduce this tokenizer in a model folder (tokenizer.model or tokenizer.json)."""
        return self._vocab.files

    @property
    def model_proto(self) -> bytes:
        """The serialized sentencepiece model (a tokenizer.json-based tokenizer has none)."""
        if MODEL_FILE not in self.files:
            raise GemmaError(f"{self._where}: a tokenizer.json tokenizer has no sentencepiece model")
        return self.files[MODEL_FILE]

    def hf_tokenizer_config(self, generation: int) -> dict:
        """tokenizer_config.json for an exported HF folder, as Google's repos carry it: <bos> added, the special
        tokens by name, the generation's official chat template; transformers' tokenizer then encodes and
        apply_chat_templates as this one does."""
        from gemma.tokenizer.templates import official_template

        names = {f"{role}_token": self._vocab.piece(i) for role, i in (("bos", self._bos_id), ("eos", self._eos_id))}
        names["pad_token"] = self._vocab.piece(self._pad_id)
        unk = self._vocab.token_id("<unk>")
        if unk is not None:
            names["unk_token"] = "<unk>"
        return {
            "tokenizer_class": "GemmaTokenizer",
            "add_bos_token": True,
            "add_eos_token": False,
            **names,
            "clean_up_tokenization_spaces": False,
            "chat_template": official_template(generation),
        }

    def save(self, path):
        """Write the vocabulary file atomically (gemma.writing: a temporary file beside it, renamed into place) into
        a folder that exists."""
        path = Path(path)
        if not path.parent.is_dir():
            raise GemmaError(f"{path}: cannot write the tokenizer file (there is no folder {path.parent})")
        (data,) = self.files.values()
        write_atomically(path, data)

    # ---- ids ----

    @property
    def vocab_size(self) -> int:
        return self._vocab.size

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
        """The id that opens a turn (<start_of_turn>, Gemma 4's <|turn>); None when the model has no chat format."""
        return self._start_id

    @property
    def end_of_turn_id(self) -> int | None:
        """The id that closes a turn (<end_of_turn>, Gemma 4's <turn|>)."""
        return self._end_id

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end generation: <eos>, the end-of-turn marker where the model has one, and Gemma 4's
        <|tool_response> (a model turn that calls tools stops there for the caller to answer)."""
        ids = [self._eos_id, self._end_id]
        if self.chat_format == 4:
            ids.append(self._gemma4["<|tool_response>"])
        return tuple(dict.fromkeys(i for i in ids if i is not None))

    def is_byte(self, i: int) -> bool:
        """Whether id `i` is a byte-fallback piece (<0x41>): one byte of a character the vocabulary lacks."""
        return self._vocab.is_byte(i)

    def piece(self, i: int) -> str:
        """The vocabulary's piece of id `i` as stored ("▁the", "<0xE4>", "<bos>")."""
        return self._vocab.piece(int(i))

    def marker_id(self, piece: str) -> int | None:
        """The id of one of Gemma 4's markers (`<|channel>`, `<|tool_call>`, ...), None when the vocabulary lacks it."""
        return self._gemma4.get(piece)

    # ---- text ----

    def encode(self, text: str, bos: bool = True) -> list[int]:
        """Plain encoding, as the reference tokenizer does it: marker pieces in `text` are matched."""
        if not isinstance(text, str):
            # sentencepiece would accept a list and return a list of lists.
            raise TypeError(f"encode() takes a str, got {type(text).__name__}")
        ids = self._vocab.encode(text)
        # Prepended by hand: sentencepiece's add_bos only works when the model declares bos_id itself.
        return [self._bos_id] + ids if bos else ids

    def _encode(self, text: str) -> list[int]:
        return self._vocab.encode(text)

    def decode(self, ids) -> str:
        """Text of `ids` (a list, tuple or tensor of ints). <bos>, <eos> and <pad> decode to nothing."""
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        ids = [int(i) for i in ids]
        if isinstance(self._vocab, JsonVocab):  # sentencepiece drops its control pieces itself
            control = {self._bos_id, self._eos_id, self._pad_id}
            ids = [i for i in ids if i not in control]
        return self._vocab.decode(ids)

    def encode_content(self, text: str) -> list[int]:
        """Encode message content (no <bos>) so that marker literals inside it stay text; decode() still returns
        the exact text."""
        return self._vocab.encode_text(text)

    _encode_span = encode_content  # the former private name

    # ---- chat ----

    def chat_parts(self, messages, add_generation_prompt: bool = True, tools=None, enable_thinking: bool = False):
        """The chat template as marker ids (int) and the text spans between them (str)."""
        if self.chat_format == 4:
            return gemma4.render(
                self._markers4(), self._bos_id, messages, add_generation_prompt, tools, enable_thinking
            ).merged()
        if self._start_id is None or self._end_id is None:
            raise GemmaError(f"{self._where}: tokenizer has no chat pieces (<start_of_turn>/<end_of_turn>)")
        if tools:
            raise GemmaError("chat: tools need Gemma 4's chat format (this tokenizer is Gemma 1-3's)")
        if enable_thinking:
            raise GemmaError("chat: thinking needs Gemma 4's chat format (this tokenizer is Gemma 1-3's)")
        return gemma3.chat_parts(self._bos_id, self._start_id, self._end_id, messages, add_generation_prompt)

    def _markers4(self) -> dict[str, int]:
        missing = [p for p, i in self._gemma4.items() if i is None]
        if missing:
            raise GemmaError(f"{self._where}: tokenizer has no {missing[0]} piece (Gemma 4's chat markers)")
        return self._gemma4

    def tagged_chat(self, messages, tools=None) -> list[tuple[int | str, str]]:
        """Gemma 4's rendering of a whole conversation (no generation prompt) as (part, tag) pairs, the tag saying
        who writes the part: "prompt", "model" or "thought" (gemma.tokenizer.gemma4.Parts); for training masks."""
        if self.chat_format != 4:
            raise GemmaError("chat: tagged conversations are Gemma 4's (this tokenizer is Gemma 1-3's)")
        parts = gemma4.render(self._markers4(), self._bos_id, messages, False, tools, False)
        return list(zip(parts.out, parts.tags))

    def render_chat(self, messages, add_generation_prompt: bool = True, tools=None, enable_thinking: bool = False):
        """The chat template as text, as transformers renders it (for debugging and tests)."""
        parts = self.chat_parts(messages, add_generation_prompt, tools, enable_thinking)
        return "".join(p if isinstance(p, str) else self._vocab.piece(p) for p in parts)

    def apply_chat(
        self, messages, add_generation_prompt: bool = True, tools=None, enable_thinking: bool = False
    ) -> list[int]:
        """Token ids of the chat template; message content is text and never yields a marker id. `tools` (OpenAI
        function schemas) and `enable_thinking` are Gemma 4's."""
        ids = []
        for part in self.chat_parts(messages, add_generation_prompt, tools, enable_thinking):
            if isinstance(part, str):
                ids += self.encode_content(part)
            else:
                ids.append(part)
        return ids


def _config_roles(path: Path) -> dict[str, str]:
    """bos/eos/pad token names from a tokenizer_config.json (a string or {"content": ...}); {} without the file."""
    if not path.exists():
        return {}
    config = read_json_file(path, "tokenizer config")
    roles = {}
    if isinstance(config, dict):
        for name in ("bos", "eos", "pad"):
            value = config.get(f"{name}_token")
            value = value.get("content") if isinstance(value, dict) else value
            if isinstance(value, str) and value:
                roles[name] = value
    return roles
