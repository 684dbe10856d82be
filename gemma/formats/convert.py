"""Conversion between model formats: any source in, an HF or native folder out."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gemma.formats.checkpoint import build_model, save_hf, save_native
from gemma.model.config import GemmaConfig
from gemma.errors import GemmaError
from gemma.files import check_source_file, refuse_overwriting_inputs
from gemma.writing import clean_leftovers
from gemma.formats.load import adapter_loader, check_adapter_folder, load_weights
from gemma.tokenizer import Tokenizer

FORMATS = ("native", "hf")


def write_model(
    dst: str | Path,
    to: str,
    cfg: GemmaConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Write a model folder in format `to` (`native` or `hf`), atomically."""
    dst = Path(dst)
    if to == "native":
        save_native(dst, cfg, state, tokenizer.files, dtype=dtype, force=force)
    elif to == "hf":
        ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
        if tokenizer.end_of_turn_id is not None:
            ids["end_of_turn_id"] = tokenizer.end_of_turn_id
        ids["stop_ids"] = list(tokenizer.stop_ids)
        config = tokenizer.hf_tokenizer_config(cfg.generation)
        save_hf(dst, cfg, state, tokenizer.files, ids, dtype=dtype, force=force, tokenizer_config=config)
    else:
        raise GemmaError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    return dst


def merge_adapter(cfg: GemmaConfig, state: dict[str, torch.Tensor], adapter: str | Path) -> dict[str, torch.Tensor]:
    """The state dict with a PEFT adapter merged in (through lora/'s loader, `adapter_loader`; the base tensors are
    updated in place). The merge is computed in float32 and rounded once to each weight's dtype."""
    model = build_model(cfg, state)  # holds the tensors of `state`, no copy
    merged = adapter_loader()(model, adapter, merge=True).state_dict()
    return {k: merged[k] for k in state}  # the base names only: no LoRA tensors in the output


def convert(
    src: str | Path,
    dst: str | Path,
    to: str,
    dtype: torch.dtype | None = None,
    force: bool = False,
    adapter: str | Path | None = None,
) -> Path:
    """Convert any model source to an HF or native folder; `dtype` None keeps the stored dtypes. With `adapter`
    (a PEFT folder) the output holds the merged weights."""
    if to not in FORMATS:
        raise GemmaError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    # Everything that can be checked is, before the (possibly long) read.
    refuse_overwriting_inputs({"DST": dst}, {"SRC": src, "--adapter": adapter})
    check_source_file(src)
    clean_leftovers(Path(dst))  # puts back a DST that a killed run had renamed aside, before asking if it exists
    if os.path.lexists(dst) and not force:
        raise GemmaError(f"{dst}: already exists (use --force to overwrite)")
    if adapter is not None:
        check_adapter_folder(adapter)
    # With an adapter, merge at the stored precision and cast once on writing.
    cfg, state, tokenizer = load_weights(src, None if adapter is not None else dtype)
    if adapter is not None:
        state = merge_adapter(cfg, state, adapter)
    return write_model(dst, to, cfg, state, tokenizer, dtype=dtype, force=force)
