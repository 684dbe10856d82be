"""A tiny Gemma 4 with a Gemma-4-style tokenizer.json, and a scripted output head that makes it write a chosen reply
(marker ids included): for the tests of what happens to a model's reply after it is sampled (the server's tool calls
and thoughts, the chat's --think). Importable helper, not a test file."""

from __future__ import annotations

from pathlib import Path

import torch


class Script:
    """Replaces a model's output head: each call writes the next id of the script (every row, every column)."""

    def __init__(self, model):
        self.model, self.ids, self.n = model, [], 0
        model.logits = self

    def say(self, ids: list[int]) -> None:
        self.ids, self.n = list(ids), 0

    def __call__(self, h):
        out = torch.zeros(*h.shape[:2], self.model.config.vocab_size)
        out[..., self.ids[min(self.n, len(self.ids) - 1)]] = 50.0
        self.n += 1
        return out


def tiny_gemma4(folder: Path):
    """(tokenizer, model): the tiny Gemma-4-style tokenizer.json written into `folder`, and the "all" test model
    (every Gemma 4 branch) of test_gemma4.py with its vocabulary."""
    from gemma.formats.checkpoint import build_model, hf_names
    from gemma.tokenizer import Tokenizer
    from test_gemma4 import hf_gemma4, our_config
    from tiny_tokenizer import build_gemma4_tokenizer_json

    tok = Tokenizer(build_gemma4_tokenizer_json(folder) / "tokenizer.json")
    hf = hf_gemma4("all", vocab=1024)
    cfg, theirs = our_config(hf), hf.state_dict()
    return tok, build_model(cfg, {native: theirs[name].clone() for native, name in hf_names(cfg).items()})


def reply_ids(tok, *spans, stop: str = "<turn|>") -> list[int]:
    """A scripted model turn: text spans and marker pieces (by their names), ending at a stop id."""
    ids = []
    for span in spans:
        ids += [tok.marker_id(span)] if tok.marker_id(span) is not None else tok.encode_content(span)
    return ids + [tok.marker_id(stop)]
