"""Models for the generation tests (importable helper, not a test file).

`tiny_generator`: a tiny random model of each generation whose vocabulary is the tiny tokenizer's, so every id it
samples decodes. The tiny parity models copy their input token forever under greedy decoding (with tied
embeddings and large random embeddings, a token's own embedding dominates the final hidden state); here the
embeddings are shrunk so that the random layers steer, and the final norm is scaled up so that the logits are not
flat. Greedy generation then visits many different tokens, which is what the generation tests need.

`real_270m`: the real Gemma 3 270M, loaded once per test session (the GGUF load takes tens of seconds).
"""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import torch

from gemma.formats.checkpoint import build_model, load_hf_folder, save_native
from gemma.tokenizer import Tokenizer
from tiny_models import hf_model

EMBED_SCALE = 0.02
FINAL_NORM_SCALE = 20.0


def tiny_generator_weights(case: str, tokenizer: Tokenizer, folder: Path, seed: int = 0):
    """(config, native state dict) of the generation model for `case`; `folder` receives the HF export."""
    hf_model(case, seed).save_pretrained(folder)
    cfg, state = load_hf_folder(folder)
    vocab = tokenizer.vocab_size
    cfg = dataclasses.replace(cfg, vocab_size=vocab)
    state["embed.weight"] = state["embed.weight"][:vocab].clone() * EMBED_SCALE
    offset = cfg.norm_offset  # RMSNorm multiplies by offset + w (Gemma 1-3: 1 + w; Gemma 4: w)
    state["norm.weight"] = (state["norm.weight"] + offset) * FINAL_NORM_SCALE - offset
    return cfg, state


def tiny_generator(case: str, tokenizer: Tokenizer, folder: Path, seed: int = 0):
    return build_model(*tiny_generator_weights(case, tokenizer, folder, seed))


def tiny_generator_folder(case: str, tokenizer: Tokenizer, folder: Path, seed: int = 0) -> Path:
    """A native model folder (config, weights, tokenizer.model) that `gemma.load` and tools/chat.py accept."""
    cfg, state = tiny_generator_weights(case, tokenizer, folder / "hf", seed)
    save_native(folder / "native", cfg, state, tokenizer.model_proto)
    return folder / "native"


@functools.cache
def real_270m():
    """(model, tokenizer) of the real Gemma 3 270M in float32."""
    import gemma

    return gemma.load("3-270m", dtype=torch.float32)
