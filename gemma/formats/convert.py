"""Conversion between model formats: any source in, an HF or native folder or a GGUF file out."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from gemma.formats.checkpoint import build_model, save_hf, save_native
from gemma.model.config import GemmaConfig
from gemma.errors import GemmaError
from gemma.files import check_source_file, refuse_overwriting_inputs
from gemma.writing import clean_leftovers, write_atomically
from gemma.formats.load import adapter_loader, check_adapter_folder, load_weights, read_config
from gemma.tokenizer import Tokenizer

FORMATS = ("native", "hf", "gguf")


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


def write_gguf_file(
    dst: str | Path,
    cfg: GemmaConfig,
    state: dict[str, torch.Tensor],
    tokenizer: Tokenizer,
    dtype: str = "bf16",
    modelfile: bool = False,
    name: str = "Gemma",
) -> dict[str, int]:
    """Write a .gguf file (gguf_write.write_gguf) and, with `modelfile`, an Ollama Modelfile beside it
    (DST's name with .Modelfile for .gguf), installed only after the GGUF is complete."""
    from gemma.formats.gguf_write import write_gguf
    from gemma.formats.ollama import modelfile as modelfile_text

    dst = Path(dst)
    counts = write_gguf(dst, cfg, state, tokenizer, dtype=dtype, name=name)
    if modelfile:
        write_atomically(modelfile_path(dst), modelfile_text(dst.name, cfg.generation))
    return counts


def modelfile_path(dst: str | Path) -> Path:
    """Where --modelfile writes the Ollama Modelfile of a GGUF file: beside it, named after it."""
    dst = Path(dst)
    return dst.with_name((dst.name[: -len(".gguf")] if dst.name.endswith(".gguf") else dst.name) + ".Modelfile")


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
    gguf_dtype: str = "bf16",
    modelfile: bool = False,
) -> Path:
    """Convert any model source to an HF or native folder, or a GGUF file; `dtype` None keeps the stored dtypes
    (`gguf_dtype` is the GGUF output's: bf16, f16, f32, q8_0 or q4_0). With `adapter` (a PEFT folder) the output
    holds the merged weights; with `modelfile` a GGUF output gets an Ollama Modelfile beside it."""
    if to not in FORMATS:
        raise GemmaError(f"unknown output format {to!r}; choose one of {', '.join(FORMATS)}")
    if modelfile and to != "gguf":
        raise GemmaError("--modelfile goes with --to gguf")
    if to == "gguf":
        from gemma.formats.gguf_write import gguf_dtype as check_gguf_dtype

        gguf_dtype = check_gguf_dtype(gguf_dtype)
    # Everything that can be checked is, before the (possibly long) read.
    refuse_overwriting_inputs({"DST": dst}, {"SRC": src, "--adapter": adapter})
    check_source_file(src)
    clean_leftovers(Path(dst))  # puts back a DST that a killed run had renamed aside, before asking if it exists
    if os.path.lexists(dst) and not force:
        raise GemmaError(f"{dst}: already exists (use --force to overwrite)")
    if to == "gguf":
        if os.path.isdir(dst):
            raise GemmaError(f"{dst}: is a folder; --to gguf writes one .gguf file")
        if modelfile and os.path.lexists(modelfile_path(dst)) and not force:
            raise GemmaError(f"{modelfile_path(dst)}: already exists (use --force to overwrite)")
    if adapter is not None:
        check_adapter_folder(adapter)
    # With an adapter, merge at the stored precision and cast once on writing.
    if to == "gguf":
        from gemma.formats.gguf_write import gguf_architecture

        dtype = None  # the GGUF types are gguf_dtype's
        gguf_architecture(read_config(src))  # refused before the weights are read
    cfg, state, tokenizer = load_weights(src, None if adapter is not None else dtype)
    if adapter is not None:
        state = merge_adapter(cfg, state, adapter)
    if to == "gguf":
        name = cfg.hf_repo.split("/")[-1] if cfg.hf_repo else Path(str(src).rstrip("/")).name.removesuffix(".gguf")
        write_gguf_file(dst, cfg, state, tokenizer, gguf_dtype, modelfile=modelfile, name=name)
        return Path(dst)
    return write_model(dst, to, cfg, state, tokenizer, dtype=dtype, force=force)
