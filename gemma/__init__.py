"""Gemma 1, 2 and 3 text models in plain PyTorch."""

from gemma.config import PRESETS, GemmaConfig, preset
from gemma.errors import GemmaError
from gemma.load import load
from gemma.model import Gemma
from gemma.sampling import generate

__all__ = ["Gemma", "GemmaConfig", "GemmaError", "PRESETS", "generate", "load", "preset"]
