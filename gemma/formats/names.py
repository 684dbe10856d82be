"""The one mechanism behind every parameter-name table (HF safetensors, GGUF): a format's names for the native
ones, per config, and the strict check that a file's tensors are exactly those of the config.

A table is data: the top-level names, one set per layer (`{}` is the layer index), and the per-layer names that
only some configs have (Gemma 3's q/k norms; Gemma 2/3's sandwich norms, or Gemma 1's plain one). The check runs on
names and shapes alone, before any tensor data is read, so a wrong file costs nothing to refuse.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable

from gemma.errors import GemmaError
from gemma.model.config import GemmaConfig


@dataclass(frozen=True)
class NameTable:
    """native name -> a format's name, for the tensors of a model with a given config."""

    top: dict[str, str]
    layer: dict[str, str]  # every layer's
    qk_norm: dict[str, str]  # with use_qk_norm
    sandwich_norms: dict[str, str]  # with sandwich_norms
    plain_norms: dict[str, str] = field(default_factory=dict)  # without sandwich_norms
    layer_scalar: dict[str, str] = field(default_factory=dict)  # with layer_scalar (Gemma 4)
    per_layer_top: dict[str, str] = field(default_factory=dict)  # with per_layer_input_size (PLE): the model's
    per_layer: dict[str, str] = field(default_factory=dict)  # ... and each layer's
    moe: dict[str, str] = field(default_factory=dict)  # with num_experts: each layer's

    def names(self, cfg: GemmaConfig) -> dict[str, str]:
        layer = dict(self.layer)
        if cfg.use_qk_norm:
            layer.update(self.qk_norm)
        layer.update(self.sandwich_norms if cfg.sandwich_norms else self.plain_norms)
        if cfg.layer_scalar:
            layer.update(self.layer_scalar)
        if cfg.per_layer_input_size:
            layer.update(self.per_layer)
        if cfg.num_experts:
            layer.update(self.moe)
        names = dict(self.top)
        if cfg.per_layer_input_size:
            names.update(self.per_layer_top)
        for i in range(cfg.num_layers):
            names.update({k.format(i): v.format(i) for k, v in layer.items() if k not in lacks(cfg, i)})
        return names


V = "layers.{}.attn.v.weight"  # the value projection's native name, which a keys-equal-values layer lacks
KV_OWN = ("layers.{}.attn.k.weight", V, "layers.{}.attn.k_norm.weight")  # what a KV-sharing layer lacks


def lacks(cfg: GemmaConfig, layer: int) -> set[str]:
    """The per-layer native names (templates) that `layer` of `cfg` has no tensor for."""
    if cfg.reuses_kv(layer):
        return set(KV_OWN)
    return set() if cfg.has_v(cfg.layer_types[layer]) else {V}


def match_tensors(
    tensors: Iterable[tuple[str, str, tuple[int, ...]]],
    to_native: Callable[[str], str | None],
    shapes: dict[str, tuple[int, ...]],
    where: str,
    show: Callable[[str], str],
) -> dict[str, tuple[str, str]]:
    """native name -> (where, key) for a file's tensors, given as (where, key, shape), strictly against `shapes`
    (the config's native names and shapes): an unexpected tensor, one that appears twice, a wrong shape or a
    missing one is a GemmaError naming it. `to_native` maps a key to its native name (None: not ours, skipped;
    KeyError: unexpected); `where` and `show` (a native name in the file's spelling) are for a missing tensor."""
    found: dict[str, tuple[str, str]] = {}
    for place, key, shape in tensors:
        try:
            name = to_native(key)
        except KeyError:
            name = ""  # unexpected
        if name is None:
            continue
        if name not in shapes:
            raise GemmaError(f"{place}: unexpected tensor {key!r} (not part of this model's config)")
        if name in found:
            raise GemmaError(f"{place}: tensor {key!r} appears twice")
        if tuple(shape) != shapes[name]:
            raise GemmaError(f"{place}: tensor {key!r} has shape {tuple(shape)}, the config needs {shapes[name]}")
        found[name] = (place, key)
    missing = [n for n in shapes if n not in found]
    if missing:
        raise GemmaError(
            f"{where}: missing tensor {show(missing[0])!r}"
            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else "")
        )
    return found
