"""The model core: the config (`GemmaConfig`, presets, bounds), the layers, attention, the KV cache, the model
itself (`Gemma`, in transformer.py), its compiled form and weight-only quantization. Nothing here reads or writes a
file format or samples a token; gemma.formats and gemma.generation build on it."""

from gemma.model.config import PRESETS, GemmaConfig, preset
from gemma.model.kv_cache import KVCache
from gemma.model.transformer import Gemma

__all__ = ["Gemma", "GemmaConfig", "KVCache", "PRESETS", "preset"]
