"""The formats: HF and native safetensors folders (checkpoint.py), HF's config.json (hf_config.py), GGUF (gguf.py),
the name-table mechanism and strict tensor check those share (names.py), finding and loading a model from any of
them (load.py: `load`, `resolve`) and converting between them (convert.py)."""

from gemma.formats.load import load, load_weights, resolve

__all__ = ["load", "load_weights", "resolve"]
