"""Gemma 1, 2 and 3 text models in plain PyTorch: the model core (gemma.model), the formats it loads and writes
(gemma.formats), generation (gemma.generation) and the OpenAI-compatible server over it (gemma.serving)."""

from gemma.errors import GemmaError
from gemma.formats.load import load
from gemma.generation.batch import generate
from gemma.model import PRESETS, Gemma, GemmaConfig, preset

__all__ = ["Gemma", "GemmaConfig", "GemmaError", "PRESETS", "generate", "load", "preset"]
