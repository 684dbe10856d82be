"""Adapters in the PEFT format, both ways, and merging a state dict.

A PEFT adapter folder holds `adapter_config.json` (a peft `LoraConfig`) and `adapter_model.safetensors` whose keys
are the HF module paths under `base_model.model.` with peft's suffixes, for example
`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight` (and `...lora_magnitude_vector` for DoRA).
Native names come from the same table the base checkpoints use (`gemma.formats.checkpoint.hf_names`).

Reading is strict: every tensor the config implies must be present with its shape, nothing else may be, and a
peft option we do not implement (bias training, modules_to_save, layers_to_transform, rank_pattern, ...) is an
error rather than a partial load.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from gemma.formats.checkpoint import atomic_dir, expected_shapes, hf_names, hf_text_key, save_safetensors, write_json
from gemma.files import read_json
from gemma.model.config import GemmaConfig, shown
from gemma.errors import GemmaError
from gemma.files import regular_file
from gemma.model import Gemma
from lora.config import ALL_TARGETS, LoraConfig
from lora.inject import adapter_state_dict, inject, lora_layers, module_path
from lora.inject import merge as merge_layers
from lora.layer import merge_weight

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
LEGACY_WEIGHTS_FILE = "adapter_model.bin"  # what peft wrote before safetensors became its default
PEFT_PREFIX = "base_model.model."  # PeftModelForCausalLM -> LoraModel -> the transformers model

# Our adapter parameter -> peft's suffix after the module path.
_PEFT_SUFFIX = {"lora_A": "lora_A.weight", "lora_B": "lora_B.weight", "magnitude": "lora_magnitude_vector"}
# Every spelling peft has written (older versions stored the magnitude with a `.weight`).
_FROM_PEFT_SUFFIX = {**{v: k for k, v in _PEFT_SUFFIX.items()}, "lora_magnitude_vector.weight": "magnitude"}

# adapter_config.json keys, by how we treat them. Any other key must hold a neutral value (null, false, {}, [],
# "none"): a set option we do not know changes what the adapter means, so it is refused.
_USED = {
    "peft_type",
    "task_type",
    "r",
    "lora_alpha",
    "lora_dropout",
    "target_modules",
    "use_rslora",
    "use_dora",
    "bias",
    "init_lora_weights",
    "base_model_name_or_path",
}
_INFORMATIONAL = {
    "revision",
    "inference_mode",
    "peft_version",
    "auto_mapping",
    "megatron_core",
    "runtime_config",
    "qalora_group_size",  # only read with use_qalora
    "ensure_weight_tying",  # only acts on modules_to_save / trainable tokens
    "loftq_config",
    "eva_config",
    "corda_config",
    "lora_ga_config",
}  # initialisation-time settings
# Initialisations after which the adapter is a plain LoRA on the unchanged base weights. The others (pissa, olora,
# corda, loftq, lora_ga) rewrite the base weights, and mica is a LoRA variant.
_PLAIN_INITS = {True, False, "gaussian", "eva", "orthogonal"}
_NEUTRAL = (None, False, "none", {}, [])

# A regex target_modules is matched against every module path (7 per layer, 3 spellings each) with a time limit:
# a pattern with nested repetition, such as "(a+)+x", backtracks exponentially on each path and would hang the
# load. Python's re cannot be interrupted, so the matching runs in the `regex` package (re's semantics, with a
# timeout); the pattern is still compiled by re first, so it means what it means to peft, which uses re.
# Patterns longer than any selector (peft's examples are under 50 characters) are refused before compiling.
REGEX_SECONDS = 2.0  # for all paths of the model together
MAX_REGEX_LENGTH = 1000


# ---- names -------------------------------------------------------------------------------------------------------


def _hf_module(names: dict[str, str], layer: int, target: str) -> str:
    """`model.layers.0.self_attn.q_proj` for (0, "q"), from the base checkpoint's name table."""
    return names[f"{module_path(layer, target)}.weight"].removesuffix(".weight")


def projections(model_cfg: GemmaConfig, names: dict[str, str]) -> list[tuple[int, str]]:
    """(layer, target) of every projection the model has, in model order, from its name table `names` (Gemma 4's
    keys-equal-values layers have no v)."""
    layers = range(model_cfg.num_layers)
    return [(i, t) for i in layers for t in ALL_TARGETS if f"{module_path(i, t)}.weight" in names]


def hf_target_names(model_cfg: GemmaConfig) -> dict[str, str]:
    """Our target name -> peft's target_modules entry: q -> q_proj, ..., down -> down_proj."""
    names = hf_names(model_cfg)
    first = {t: i for i, t in reversed(projections(model_cfg, names))}  # the first layer with each
    return {t: _hf_module(names, first[t], t).rpartition(".")[2] for t in ALL_TARGETS}


def peft_names(model_cfg: GemmaConfig, cfg: LoraConfig) -> dict[str, str]:
    """native adapter name (`layers.0.attn.q.lora_A`) -> peft key, for every tensor the adapter holds."""
    names = hf_names(model_cfg)
    kinds = ("lora_A", "lora_B", "magnitude") if cfg.dora else ("lora_A", "lora_B")
    return {
        f"{module_path(i, t)}.{kind}": f"{PEFT_PREFIX}{_hf_module(names, i, t)}.{_PEFT_SUFFIX[kind]}"
        for i, t in projections(model_cfg, names)
        if t in cfg.targets
        for kind in kinds
    }


def _spellings(hf_module: str) -> tuple[str, ...]:
    """The paths a text-tower module has in the plain, transformers-5 multimodal and 4.x multimodal models."""
    rest = hf_module.removeprefix("model.")
    return hf_module, f"model.language_model.{rest}", f"language_model.{hf_module}"


# ---- writing -----------------------------------------------------------------------------------------------------


def peft_config(model_cfg: GemmaConfig, cfg: LoraConfig, base_model_name_or_path: str | None = None) -> dict[str, Any]:
    """The adapter_config.json peft reads: only keys that every peft version since rsLoRA and DoRA knows."""
    hf = hf_target_names(model_cfg)
    alpha = int(cfg.alpha) if float(cfg.alpha).is_integer() else cfg.alpha
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "revision": None,
        "inference_mode": True,
        "r": cfg.r,
        "lora_alpha": alpha,
        "lora_dropout": cfg.dropout,
        "target_modules": [hf[t] for t in cfg.targets],
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": cfg.rslora,
        "use_dora": cfg.dora,
        "init_lora_weights": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
    }


def write_adapter(
    folder: str | Path,
    model_cfg: GemmaConfig,
    cfg: LoraConfig,
    tensors: dict[str, torch.Tensor],
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Write adapter tensors by native name (as `load_adapter` returns them) as a PEFT folder, atomically.

    The one writer of adapter folders: `save_adapter` passes a model's own tensors, FSDP training the whole tensors
    it gathered from the shards. `tensors` must hold exactly the tensors `cfg` implies for `model_cfg`.
    """
    names = peft_names(model_cfg, cfg)
    unknown = next((k for k in tensors if k not in names), None)
    if unknown is not None:
        raise GemmaError(f"adapter: tensor {unknown!r} is not one of the LoRA settings' adapter tensors")
    missing = next((k for k in names if k not in tensors), None)
    if missing is not None:
        raise GemmaError(f"adapter: missing tensor {missing!r}")
    peft_tensors = {names[k]: (v.to(dtype) if dtype else v).contiguous().cpu() for k, v in tensors.items()}
    folder = Path(folder)
    with atomic_dir(folder, force) as tmp:
        save_safetensors(peft_tensors, tmp / WEIGHTS_FILE)
        write_json(tmp / CONFIG_FILE, peft_config(model_cfg, cfg, base_model_name_or_path))
    return folder


def save_adapter(
    model: Gemma,
    folder: str | Path,
    base_model_name_or_path: str | None = None,
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> Path:
    """Write the model's adapter as a PEFT folder, atomically (a merged model saves the same adapter)."""
    cfg = model.lora_config
    if cfg is None or not lora_layers(model):
        raise GemmaError("the model has no LoRA layers to save")
    return write_adapter(folder, model.config, cfg, adapter_state_dict(model), base_model_name_or_path, dtype, force)


# ---- reading -----------------------------------------------------------------------------------------------------


def _targets(spec: Any, model_cfg: GemmaConfig, where: str) -> tuple[str, ...]:
    """Our targets from peft's target_modules (a list of names or name suffixes, a regex, or "all-linear"), which
    must select the same projections in every layer."""
    names = hf_names(model_cfg)
    present = projections(model_cfg, names)
    modules = {(i, t): _spellings(_hf_module(names, i, t)) for i, t in present}
    if spec == "all-linear":  # peft: every linear layer but the output head
        extra = [what for what, has in _OTHER_LINEARS if has(model_cfg)]
        if extra:
            raise GemmaError(
                f"{where}: target_modules 'all-linear' on this model also adapts {' and '.join(extra)}, which is "
                f"not supported; an adapter on the seven projections lists them (q_proj, ..., down_proj)"
            )
        return ALL_TARGETS  # for Gemma 1-4 without them: the seven projections
    if isinstance(spec, str):  # peft matches a string as a regex over the whole module path
        chosen = _regex_targets(spec, modules, where)
        if not chosen:
            raise GemmaError(f"{where}: target_modules {shown(spec)} matches no module of the model")
    elif isinstance(spec, list) and spec and all(isinstance(s, str) for s in spec):
        # peft: the module path equals the entry or ends with "." + entry, i.e. the entry is one of the path's
        # dotted tails. Indexed by tail, so that a list of any length costs one look-up per entry.
        by_tail: dict[str, set] = {}
        for key, paths in modules.items():
            for p in paths:
                parts = p.split(".")
                for i in range(len(parts)):
                    by_tail.setdefault(".".join(parts[i:]), set()).add(key)
        chosen = set()
        for entry in dict.fromkeys(spec):
            hits = by_tail.get(entry)
            if not hits:
                supported = ", ".join(hf_target_names(model_cfg).values())
                if entry.rpartition(".")[2] in _FROZEN_MODULES:
                    raise GemmaError(
                        f"{where}: target module {shown(entry)} is not supported: the MoE experts and router and "
                        f"the per-layer embeddings stay frozen (LoRA applies to {supported})"
                    )
                raise GemmaError(
                    f"{where}: target module {shown(entry)} is not in the model (LoRA applies to {supported})"
                )
            chosen |= hits
    else:
        raise GemmaError(f"{where}: target_modules must be a list of module names or a regex, got {shown(spec)}")
    targets = tuple(t for t in ALL_TARGETS if any(key[1] == t for key in chosen))
    every_layer = {(i, t) for i, t in present if t in targets}  # each layer that has the projection
    if chosen != every_layer:
        raise GemmaError(
            f"{where}: target_modules {shown(spec)} selects a projection in some layers only "
            f"(per-layer targets are not supported)"
        )
    return targets


# The linear layers beside the seven projections, which peft's "all-linear" adapts too (Gemma 4).
_OTHER_LINEARS = (
    ("the per-layer embeddings' projections", lambda c: bool(c.per_layer_input_size)),
    ("the MoE router", lambda c: bool(c.num_experts)),
)


# Gemma 4 modules that peft could adapt and we keep frozen (an adapter naming one is refused by name).
_FROZEN_MODULES = {
    "experts",
    "gate_up_proj",
    "router",
    "proj",
    "per_layer_input_gate",
    "per_layer_projection",
    "per_layer_model_projection",
}


def _regex_targets(spec: str, modules: dict[tuple[int, str], tuple[str, ...]], where: str) -> set:
    """The modules one of whose paths `spec` fullmatches (peft's rule for a string), within REGEX_SECONDS."""
    import regex

    if len(spec) > MAX_REGEX_LENGTH:
        raise GemmaError(
            f"{where}: target_modules is a regex of {len(spec)} characters (at most "
            f"{MAX_REGEX_LENGTH}); list the module names instead"
        )
    try:
        re.compile(spec)
        pattern = regex.compile(spec)
    except (re.error, regex.error, RecursionError, OverflowError, ValueError) as exc:
        raise GemmaError(f"{where}: target_modules {shown(spec)} is not a valid regex ({exc})") from None
    deadline = time.monotonic() + REGEX_SECONDS
    chosen = set()
    try:
        for key, paths in modules.items():
            for p in paths:
                if pattern.fullmatch(p, timeout=max(deadline - time.monotonic(), 1e-3)):
                    chosen.add(key)
                    break
    except TimeoutError:
        raise GemmaError(
            f"{where}: target_modules {shown(spec)} takes longer than {REGEX_SECONDS:g} s to match "
            "the model's module names (nested repetition such as '(a+)+'?); list the module names "
            "instead"
        ) from None
    return chosen


def read_peft_config(path: Path, model_cfg: GemmaConfig) -> tuple[LoraConfig, str | None]:
    """(LoraConfig, base_model_name_or_path) from a peft adapter_config.json, refusing options we do not support."""
    data = read_json(path, "adapter config")
    where = str(path)
    if not isinstance(data, dict):
        raise GemmaError(f"{where}: expected a JSON object")
    if data.get("peft_type") != "LORA":
        raise GemmaError(f"{where}: peft_type {data.get('peft_type')!r} is not supported (only LORA)")
    if data.get("task_type") not in (None, "CAUSAL_LM"):
        raise GemmaError(f"{where}: task_type {data['task_type']!r} is not supported (only CAUSAL_LM)")
    if data.get("bias", "none") != "none":
        raise GemmaError(f"{where}: bias={data['bias']!r} (bias training) is not supported")
    init = data.get("init_lora_weights", True)
    if not isinstance(init, (bool, str)) or init not in _PLAIN_INITS:
        raise GemmaError(
            f"{where}: init_lora_weights={init!r} is not supported (it changes the base weights or "
            f"is a LoRA variant; convert the adapter to a plain LoRA with peft first)"
        )
    for key, value in data.items():
        if key in _USED or key in _INFORMATIONAL:
            continue
        neutral = any(value is v or (type(value) is type(v) and value == v) for v in _NEUTRAL)
        if key == "target_parameters" and not neutral:  # peft's LoRA on 3-D parameters: the MoE experts
            raise GemmaError(
                f"{where}: target_parameters={shown(value)} (an adapter on the MoE experts' weights) is not "
                f"supported: the experts stay frozen; adapt the projections ({','.join(ALL_TARGETS)}) instead"
            )
        if not neutral:
            raise GemmaError(
                f"{where}: {key}={shown(value)} is not supported "
                f"(only LoRA on the {','.join(ALL_TARGETS)} projections of every layer)"
            )
    targets = _targets(data.get("target_modules"), model_cfg, where)  # its errors name `where` already
    try:
        cfg = LoraConfig(
            r=data.get("r", 8),
            alpha=data.get("lora_alpha", 8),
            dropout=data.get("lora_dropout", 0.0),
            targets=targets,
            rslora=bool(data.get("use_rslora", False)),
            dora=bool(data.get("use_dora", False)),
        )
    except GemmaError as exc:
        raise GemmaError(f"{where}: {exc}") from None
    return cfg, data.get("base_model_name_or_path")


def _weights_file(folder: Path) -> Path:
    for name in (WEIGHTS_FILE, LEGACY_WEIGHTS_FILE):
        if (folder / name).exists():
            return regular_file(folder / name, "weights file")  # a FIFO or /dev/zero would be read forever
    raise GemmaError(f"{folder}: no {WEIGHTS_FILE}")


def _reason(exc: Exception) -> str:
    # An OSError's own text repeats the path, which the message names already.
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def _safetensors(path: Path):
    """(file, key, loader) for each tensor of a safetensors file; corruption is a GemmaError."""
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                yield path, key, (lambda f=f, key=key: f.get_tensor(key))
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise GemmaError(f"{path}: corrupt or truncated safetensors file ({_reason(exc)})") from None


def _legacy_tensors(path: Path):
    """(file, key, loader) from a pickled adapter_model.bin, read with weights_only (no code runs)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a corrupt or hostile pickle raises many kinds of errors
        raise GemmaError(f"{path}: cannot read ({type(exc).__name__}: {_reason(exc)})") from None
    if not isinstance(state, dict):
        raise GemmaError(f"{path}: not a state dict")
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise GemmaError(f"{path}: entry {key!r} is not a tensor")
        yield path, key, (lambda value=value: value)


def _native_key(key: str, to_native: dict[str, str]) -> str | None:
    """Our adapter name for a peft key; None for a tensor of another tower (not ours, as for base checkpoints);
    KeyError for anything that is not a LoRA weight of one of our projections."""
    if not key.startswith(PEFT_PREFIX):
        raise KeyError(key)
    plain = hf_text_key(key[len(PEFT_PREFIX) :])
    if plain is None:
        return None
    for suffix, kind in _FROM_PEFT_SUFFIX.items():
        if plain.endswith("." + suffix):
            return f"{to_native[plain[: -len(suffix) - 1]]}.{kind}"
    raise KeyError(key)


def load_adapter(folder: str | Path, model_cfg: GemmaConfig) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """(LoraConfig, adapter tensors by native name) from a PEFT folder, checked against the model's config."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GemmaError(f"{folder}: no such adapter folder")
    if not (folder / CONFIG_FILE).exists():
        raise GemmaError(f"{folder}: no {CONFIG_FILE} (not a PEFT adapter folder)")
    cfg, _ = read_peft_config(folder / CONFIG_FILE, model_cfg)
    path = _weights_file(folder)

    names = hf_names(model_cfg)
    to_native = {_hf_module(names, i, t): module_path(i, t) for i, t in projections(model_cfg, names)}
    wanted = peft_names(model_cfg, cfg)  # native -> peft key
    base = expected_shapes(model_cfg)
    hf_short = hf_target_names(model_cfg)

    tensors: dict[str, torch.Tensor] = {}
    source = _legacy_tensors(path) if path.name == LEGACY_WEIGHTS_FILE else _safetensors(path)
    for file, key, read in source:
        try:
            name = _native_key(key, to_native)
        except KeyError:
            raise GemmaError(
                f"{file}: unexpected tensor {key!r} (not a LoRA weight of a {','.join(hf_short.values())} projection)"
            ) from None
        if name is None:
            continue  # a vision-tower adapter weight: it does not touch the text model
        module, _, kind = name.rpartition(".")
        target = module.rpartition(".")[2]
        if target not in cfg.targets:
            raise GemmaError(
                f"{file}: tensor {key!r} is for {hf_short[target]}, which target_modules in {CONFIG_FILE} does not list"
            )
        if kind == "magnitude" and not cfg.dora:
            raise GemmaError(f"{file}: tensor {key!r} is a DoRA magnitude but use_dora is false in {CONFIG_FILE}")
        if name in tensors:
            raise GemmaError(f"{file}: tensor {key!r} appears twice")
        try:
            tensor = read()
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise GemmaError(f"{file}: cannot read tensor {key!r} ({_reason(exc)})") from None
        out_f, in_f = base[f"{module}.weight"]
        shape = {"lora_A": (cfg.r, in_f), "lora_B": (out_f, cfg.r), "magnitude": (out_f,)}[kind]
        if tuple(tensor.shape) != shape:
            raise GemmaError(
                f"{file}: tensor {key!r} has shape {tuple(tensor.shape)}, expected {shape} "
                f"(r={cfg.r} in {CONFIG_FILE}; the model's {hf_short[target]} is {out_f}x{in_f})"
            )
        if not tensor.is_floating_point():
            raise GemmaError(f"{file}: tensor {key!r} has non-float dtype {tensor.dtype}")
        if not torch.isfinite(tensor).all():  # it would turn every output (or merged weight) into NaN
            raise GemmaError(f"{file}: tensor {key!r} holds NaN or infinite values")
        tensors[name] = tensor
    missing = [wanted[n] for n in wanted if n not in tensors]
    if missing:
        raise GemmaError(
            f"{path}: missing tensor {missing[0]!r}" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return cfg, tensors


def apply_adapter(model: Gemma, folder: str | Path, merge: bool = False) -> Gemma:
    """Inject the adapter's LoRA layers into `model` and load its weights strictly; `merge` folds them into
    the base weights (exactly, undoable with `lora.unmerge`). What `gemma.load(adapter=)` calls (it imports this
    module by name: gemma.formats.load.ADAPTER_MODULE)."""
    cfg, tensors = load_adapter(folder, model.config)
    inject(model, cfg)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in tensors.items():
            params[name].copy_(tensor)  # cast to the model's dtype and device
    if merge:
        merge_layers(model)
        bad = next((path for path, layer in lora_layers(model).items() if not torch.isfinite(layer.weight).all()), None)
        if bad is not None:  # finite parts can still overflow (a huge lora_alpha, a bf16 base)
            raise GemmaError(f"{folder}: merging the adapter into {bad} gives NaN or infinite weights")
    return model


def merged_state_dict(
    base_state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], cfg: LoraConfig
) -> dict[str, torch.Tensor]:
    """A new native state dict with the adapter (native names, as `load_adapter` returns) merged in. Pure: the
    inputs are not modified, and tensors without an adapter are shared, not copied."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in adapter.items():
        module, _, kind = name.rpartition(".")
        modules.setdefault(module, {})[kind] = tensor
    out = dict(base_state)
    for module, parts in modules.items():
        needed = {"lora_A", "lora_B", "magnitude"} if cfg.dora else {"lora_A", "lora_B"}
        if set(parts) != needed:
            missing = sorted(needed - set(parts)) or sorted(set(parts) - needed)
            raise GemmaError(f"adapter: module {module!r} has an unexpected or missing tensor {missing[0]!r}")
        key = f"{module}.weight"
        if key not in base_state:
            raise GemmaError(f"adapter: module {module!r} is not in the base state dict")
        out[key], _ = merge_weight(base_state[key], parts["lora_A"], parts["lora_B"], cfg.scale, parts.get("magnitude"))
        if not torch.isfinite(out[key]).all():  # finite parts can still overflow (a huge lora_alpha, a bf16 base)
            raise GemmaError(f"adapter: merging module {module!r} gives NaN or infinite weights")
    return out
