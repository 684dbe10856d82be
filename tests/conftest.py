"""Shared fixtures: tiny models and a tiny tokenizer, built once per test session."""

import os
import shutil
import tempfile

import pytest

from gemma.tokenizer import Tokenizer
from tiny_models import hf_model
from tiny_tokenizer import build_tiny_tokenizer

# The tokenize-once data cache of every run the tests start (in this process and in subprocesses, which inherit the
# environment) goes to a folder of the session's own, never to the user's ~/.cache.
_CACHE = tempfile.mkdtemp(prefix="gemma-sft-test-cache-")
os.environ["GEMMA_SFT_CACHE"] = _CACHE


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_tokenizer_path(tmp_path_factory):
    """Path of a tiny Gemma-layout `tokenizer.model` (pad 0, eos 1, bos 2, unk 3, chat markers user-defined)."""
    return build_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer") / "tokenizer.model")


@pytest.fixture(scope="module")
def tok(tiny_tokenizer_path):
    """The tiny tokenizer, loaded."""
    return Tokenizer(tiny_tokenizer_path)


def hf_folder(model, folder, tokenizer_path):
    """`model` (a transformers model) saved as an HF checkpoint folder with the tiny tokenizer beside it."""
    model.save_pretrained(folder)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory, tiny_tokenizer_path):
    """A tiny Gemma 3 HF checkpoint folder (random weights, written by transformers) with the tiny tokenizer."""
    return hf_folder(hf_model("gemma3"), tmp_path_factory.mktemp("tiny") / "model", tiny_tokenizer_path)


@pytest.fixture(scope="module")
def tiny_gemma2_folder(tmp_path_factory, tiny_tokenizer_path):
    """A tiny Gemma 2 HF checkpoint folder, as `tiny_folder` (for what Gemma 3 refuses: fp16 training)."""
    return hf_folder(hf_model("gemma2"), tmp_path_factory.mktemp("tiny2") / "model", tiny_tokenizer_path)
