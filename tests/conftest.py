"""Shared fixtures: tiny models and a tiny tokenizer, built once per test session."""

import pytest

from tiny_tokenizer import build_tiny_tokenizer


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """Path of a tiny Gemma-layout `tokenizer.model` (pad 0, eos 1, bos 2, unk 3, chat markers user-defined)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")
