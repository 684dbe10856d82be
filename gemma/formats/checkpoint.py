"""Checkpoint IO: HF safetensors in and out, native folders in and out, by one parameter-name table.

Loading is strict: a missing or unexpected tensor, or a shape that does not match, is a GemmaError naming the
tensor. Tensors are converted to the requested dtype one at a time, so a load never holds two full copies.
Every folder is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from pathlib import Path
from typing import Callable, Iterator

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from gemma.model.config import GemmaConfig, shown
from gemma.formats.hf_config import HF_FIELDS, from_hf_config, to_hf_config
from gemma.errors import GemmaError
from gemma.files import read_json, regular_file
from gemma.writing import clean_leftovers, install, remove_path, sync_tree, temporary_path
from gemma.formats.names import NameTable, match_tensors
from gemma.model import Gemma

# ---- the name table ------------------------------------------------------------------------------------------------

_TOP = {"embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
_LAYER = {
    "layers.{}.attn_norm.weight": "model.layers.{}.input_layernorm.weight",
    "layers.{}.attn.q.weight": "model.layers.{}.self_attn.q_proj.weight",
    "layers.{}.attn.k.weight": "model.layers.{}.self_attn.k_proj.weight",
    "layers.{}.attn.v.weight": "model.layers.{}.self_attn.v_proj.weight",
    "layers.{}.attn.o.weight": "model.layers.{}.self_attn.o_proj.weight",
    "layers.{}.mlp.gate.weight": "model.layers.{}.mlp.gate_proj.weight",
    "layers.{}.mlp.up.weight": "model.layers.{}.mlp.up_proj.weight",
    "layers.{}.mlp.down.weight": "model.layers.{}.mlp.down_proj.weight",
}
_QK_NORM = {
    "layers.{}.attn.q_norm.weight": "model.layers.{}.self_attn.q_norm.weight",
    "layers.{}.attn.k_norm.weight": "model.layers.{}.self_attn.k_norm.weight",
}
# Gemma 1 has one norm before the MLP, which HF calls post_attention_layernorm.
_PLAIN_NORMS = {"layers.{}.mlp_norm.weight": "model.layers.{}.post_attention_layernorm.weight"}
# Gemma 2/3 "sandwich": HF's post_attention_layernorm normalises the attention output instead.
_SANDWICH_NORMS = {
    "layers.{}.post_attn_norm.weight": "model.layers.{}.post_attention_layernorm.weight",
    "layers.{}.mlp_norm.weight": "model.layers.{}.pre_feedforward_layernorm.weight",
    "layers.{}.post_mlp_norm.weight": "model.layers.{}.post_feedforward_layernorm.weight",
}

# Multimodal Gemma 3 checkpoints keep the text tower under a prefix (4.x and 5.x spellings) and carry towers that
# are not ours to load.
_TEXT_PREFIXES = (("language_model.model.", "model."), ("model.language_model.", "model."))
_NOT_OURS = (
    "vision_tower.",
    "multi_modal_projector.",
    "model.vision_tower.",
    "model.multi_modal_projector.",
    "model.audio_tower.",  # Gemma 4's audio tower and the projections into the text model
    "model.embed_vision.",
    "model.embed_audio.",
)
# The output head is tied to the embedding; a checkpoint that stores a copy of it loses nothing by skipping it.
_TIED_HEAD = ("lm_head.weight", "language_model.lm_head.weight")


# Gemma 4's per-layer embeddings (E2B, E4B) and mixture-of-experts block (26B-A4B).
_PER_LAYER_TOP = {
    "per_layer.embed.weight": "model.embed_tokens_per_layer.weight",
    "per_layer.proj.weight": "model.per_layer_model_projection.weight",
    "per_layer.proj_norm.weight": "model.per_layer_projection_norm.weight",
}
_PER_LAYER = {
    "layers.{}.ple_gate.weight": "model.layers.{}.per_layer_input_gate.weight",
    "layers.{}.ple_out.weight": "model.layers.{}.per_layer_projection.weight",
    "layers.{}.ple_norm.weight": "model.layers.{}.post_per_layer_input_norm.weight",
}
_MOE = {
    "layers.{}.dense_norm.weight": "model.layers.{}.post_feedforward_layernorm_1.weight",
    "layers.{}.moe.router.weight": "model.layers.{}.router.proj.weight",
    "layers.{}.moe.router_scale": "model.layers.{}.router.scale",
    "layers.{}.moe.expert_scale": "model.layers.{}.router.per_expert_scale",
    "layers.{}.moe.gate_up": "model.layers.{}.experts.gate_up_proj",
    "layers.{}.moe.down": "model.layers.{}.experts.down_proj",
    "layers.{}.moe.in_norm.weight": "model.layers.{}.pre_feedforward_layernorm_2.weight",
    "layers.{}.moe.out_norm.weight": "model.layers.{}.post_feedforward_layernorm_2.weight",
}

HF_TABLE = NameTable(
    _TOP,
    _LAYER,
    _QK_NORM,
    _SANDWICH_NORMS,
    _PLAIN_NORMS,
    {"layers.{}.layer_scalar": "model.layers.{}.layer_scalar"},
    _PER_LAYER_TOP,
    _PER_LAYER,
    _MOE,
)
# Released E2B files still carry keys and values for the layers that reuse another's (transformers ignores them too);
# they are dropped by name, any other unexpected tensor is still an error.
_DEAD_KV = ("k_proj", "v_proj", "k_norm", "v_norm")


def dead_kv_keys(cfg: GemmaConfig) -> set[str]:
    """The HF keys (text spelling) of the unused k/v tensors that a KV-sharing layer may come with."""
    return {f"model.layers.{i}.self_attn.{n}.weight" for i in range(cfg.first_shared, cfg.num_layers) for n in _DEAD_KV}


def hf_names(cfg: GemmaConfig) -> dict[str, str]:
    """native name -> HF name, for every tensor of a model with this config."""
    return HF_TABLE.names(cfg)


def expected_shapes(cfg: GemmaConfig) -> dict[str, tuple[int, ...]]:
    """native name -> shape, read off a model built on the meta device (no memory)."""
    with torch.device("meta"):
        model = Gemma(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def hf_text_key(key: str) -> str | None:
    """An HF checkpoint key in the plain text-model spelling, or None for a tensor that is not ours."""
    if key.startswith(_NOT_OURS) or key in _TIED_HEAD:
        return None
    for prefix, plain in _TEXT_PREFIXES:
        if key.startswith(prefix):
            return plain + key[len(prefix) :]
    return key


# ---- reading ---------------------------------------------------------------------------------------------------------


def _safetensors_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = read_json(index, "index file").get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise GemmaError(f"{index}: no weight_map")
        # Shard names are plain file names in the folder (as transformers writes them), never a path elsewhere.
        bad = next(
            (n for n in weight_map.values() if not isinstance(n, str) or not n or n == ".." or Path(n).name != n), None
        )
        if bad is not None:
            raise GemmaError(f"{index}: weight_map lists {shown(bad)}, which is not a file name in the folder")
        files = [folder / name for name in dict.fromkeys(weight_map.values())]
    elif (folder / "model.safetensors").exists():
        files = [folder / "model.safetensors"]
    else:
        files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise GemmaError(f"{folder}: no model.safetensors (nor an index of shards)")
    for f in files:
        if not f.exists():
            raise GemmaError(f"{f}: shard listed in the index is missing")
    return files


def _reason(exc: Exception) -> str:
    # An OSError's own text repeats the path, which the message names already.
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def _headers(files: list[Path]) -> dict[tuple[Path, str], tuple[int, ...]]:
    """(file, key) -> shape of every tensor, from the safetensors headers alone (no tensor data is read)."""
    shapes = {}
    for path in files:
        regular_file(path, "safetensors file")  # a FIFO or a device (/dev/zero) would be read forever
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    shapes[path, key] = tuple(f.get_slice(key).get_shape())
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise GemmaError(f"{path}: corrupt or truncated safetensors file ({_reason(exc)})") from None
    return shapes


def _iter_tensors(files: list[Path]) -> Iterator[tuple[Path, str, Callable[[], torch.Tensor]]]:
    """(file, key, loader) for each tensor; the loader reads one tensor. Corruption is a GemmaError."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt") as f:
                for key in f.keys():
                    yield path, key, (lambda f=f, key=key: f.get_tensor(key))
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise GemmaError(f"{path}: corrupt or truncated safetensors file ({_reason(exc)})") from None


_LAYER_KEY = re.compile(r"(?:model\.)?(?:layers|blk)\.(\d+)\.")  # HF, native and GGUF names of a layer's tensors


def check_layer_count(cfg: GemmaConfig, keys: list[str], where: str, field: str, weights: str) -> None:
    """Every layer the config claims must have tensors among `keys` (the file's names), checked before anything is
    built from the config: a layer count that is garbage (a million) is then one line naming `field` in `where`,
    instead of a model laid out layer by layer (on the meta device, still until memory runs out)."""
    present = {int(m[1]) for m in map(_LAYER_KEY.match, keys) if m}
    missing = next((i for i in range(cfg.num_layers) if i not in present), None)
    if missing is not None:
        raise GemmaError(
            f"{where}: {field!r} is {cfg.num_layers}, but {weights} holds tensors of {len(present)} "
            f"layers (none of layer {missing})"
        )


def check_embedding(
    cfg: GemmaConfig, shape: tuple[int, ...], key: str, where: str, fields: dict[str, str], weights: str
) -> None:
    """The embedding's shape in the file against the config's vocabulary and width, before anything is built."""
    wanted = (cfg.vocab_size, cfg.hidden_size)
    if tuple(shape) != wanted:
        vocab, hidden = (fields.get(f, f) for f in ("vocab_size", "hidden_size"))
        raise GemmaError(
            f"{where}: the embedding {key!r} in {weights} has shape {tuple(shape)}, but {vocab!r} "
            f"and {hidden!r} make it {wanted}"
        )


def read_state_dict(
    files: list[Path],
    cfg: GemmaConfig,
    to_native: Callable[[str], str | None],
    dtype: torch.dtype | None,
    show: Callable[[str], str] = lambda n: n,
    where: str = "config",
    fields: dict[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """The native state dict from safetensors files, strictly checked against `cfg`.

    `dtype` None keeps each tensor as stored. `to_native` maps a file key to a native name (None: not ours, skip;
    KeyError: unexpected). `show` turns a native name back into the file's spelling for messages; `where` is the
    config file and `fields` maps config fields to its keys, for messages about the config.

    The layer count, the embedding and every shape are checked against the files' headers before any tensor data
    is read and before the config's tables are built.
    """
    fields = fields or {}
    headers = _headers(files)
    weights = str(files[0] if len(files) == 1 else files[0].parent)
    ours = {key: plain for _, key in headers if (plain := hf_text_key(key)) is not None}
    check_layer_count(cfg, list(ours.values()), where, fields.get("num_layers", "num_layers"), weights)
    for (path, key), shape in headers.items():
        with contextlib.suppress(KeyError):
            if key in ours and to_native(key) == "embed.weight":
                check_embedding(cfg, shape, key, where, fields, str(path))

    shapes = expected_shapes(cfg)
    found = match_tensors(
        ((str(path), key, shape) for (path, key), shape in headers.items()),
        to_native,
        shapes,
        str(files[0].parent),
        show,
    )
    wanted = {(place, key) for place, key in found.values()}
    out: dict[str, torch.Tensor] = {}
    for path, key, load in _iter_tensors(files):
        if (str(path), key) not in wanted:
            continue  # not ours (a vision tower, a stored copy of the tied head)
        try:
            tensor = load()
        except (SafetensorError, OSError, RuntimeError) as exc:
            raise GemmaError(f"{path}: cannot read tensor {key!r} ({_reason(exc)})") from None
        if not tensor.is_floating_point():
            raise GemmaError(f"{path}: tensor {key!r} has non-float dtype {tensor.dtype}")
        # Always a fresh copy, one tensor at a time (never two full copies): safetensors hands out tensors backed
        # by the file's memory map, which a decoding step reads about 2x slower than ordinary memory here.
        out[to_native(key)] = tensor.to(dtype or tensor.dtype, copy=True)
    return out


def build_model(cfg: GemmaConfig, state: dict[str, torch.Tensor], device="cpu") -> Gemma:
    """A Gemma holding exactly `state` (assigned, not copied)."""
    with torch.device("meta"):
        model = Gemma(cfg)
    model.load_state_dict(state, strict=True, assign=True)
    return model.to(device).eval()


def load_hf_folder(
    folder: Path, dtype: torch.dtype | None = torch.float32
) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """(config, native state dict) from an HF checkpoint folder."""
    config = folder / "config.json"
    cfg = from_hf_config(read_json(config, "config file"), str(config))
    to_native = {v: k for k, v in hf_names(cfg).items()}
    dead = dead_kv_keys(cfg)

    def native(key: str) -> str | None:
        plain = hf_text_key(key)
        return None if plain is None or plain in dead else to_native[plain]

    state = read_state_dict(
        _safetensors_files(folder), cfg, native, dtype, show=hf_names(cfg).get, where=str(config), fields=HF_FIELDS
    )
    return cfg, state


def load_native_folder(
    folder: Path, dtype: torch.dtype | None = torch.float32
) -> tuple[GemmaConfig, dict[str, torch.Tensor]]:
    """(config, state dict) from a native folder."""
    config = folder / "config.json"
    cfg = GemmaConfig.from_dict(read_json(config, "config file"), str(config))
    path = folder / "model.safetensors"
    if not path.exists():
        raise GemmaError(f"{folder}: no model.safetensors")
    return cfg, read_state_dict([path], cfg, lambda k: k, dtype, where=str(config))


# ---- writing ---------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def atomic_dir(dst: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside `dst`; on success it replaces `dst`, on failure it is removed.

    An existing `dst` is refused unless `force`; with `force` it is replaced only once the new folder is complete
    and synced to disk, in one step where Linux can (`gemma.writing.install`). What killed writers left beside `dst`
    is cleaned up first, and an old `dst` that such a kill left parked is put back (`gemma.writing.clean_leftovers`).
    """
    dst = Path(dst)
    if dst.name in ("", ".", ".."):
        raise GemmaError(f"{dst}: names no folder that can be written (give the output folder a name)")
    clean_leftovers(dst)
    if os.path.lexists(dst):
        if not force:
            raise GemmaError(f"{dst}: already exists (use --force to overwrite)")
        mode = dst.lstat().st_mode
        if not (stat.S_ISDIR(mode) or stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
            raise GemmaError(f"{dst}: not a file or folder (a device or FIFO); not replaced")
    tmp = temporary_path(dst)
    try:
        dst.parent.mkdir(parents=True, exist_ok=True)
        remove_path(tmp)
        tmp.mkdir()
        yield tmp
        sync_tree(tmp)
        install(tmp, dst)
    except OSError as exc:  # a full disk, a read-only folder: reported at `dst`, not at the temporary name
        remove_path(tmp)
        if exc.errno is None:
            raise
        raise OSError(exc.errno, exc.strerror, str(dst)) from exc
    except BaseException:
        remove_path(tmp)
        raise


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """save_file, with the permissions an ordinary file gets (safetensors creates its files owner-only). A failed
    write (a full disk) is an OSError, as for any other file, not safetensors' own error."""
    try:
        save_file(tensors, str(path), metadata={"format": "pt"})
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        raise OSError(int(code[1]), os.strerror(int(code[1])), str(path)) from None
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, 0o666 & ~umask)


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _contiguous(state: dict[str, torch.Tensor], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    return {k: (v.to(dtype) if dtype else v).detach().contiguous().cpu() for k, v in state.items()}


def save_native(
    folder: Path,
    cfg: GemmaConfig,
    state: dict[str, torch.Tensor],
    tokenizer_proto: bytes | dict[str, bytes],
    dtype: torch.dtype | None = None,
    force: bool = False,
) -> None:
    """A native folder: config.json (our config), model.safetensors (our names), the tokenizer (`tokenizer_proto`:
    a sentencepiece model's bytes, or a tokenizer's files, {name: bytes})."""
    with atomic_dir(folder, force) as tmp:
        save_safetensors(_contiguous(state, dtype), tmp / "model.safetensors")
        write_json(tmp / "config.json", cfg.to_dict())
        write_tokenizer(tmp, tokenizer_proto)


def write_tokenizer(folder: Path, tokenizer: bytes | dict[str, bytes]) -> None:
    """The tokenizer's files into `folder`: a sentencepiece model's bytes as tokenizer.model, or {name: bytes}
    (gemma.tokenizer.Tokenizer.files: tokenizer.model or tokenizer.json)."""
    files = {"tokenizer.model": tokenizer} if isinstance(tokenizer, (bytes, bytearray)) else tokenizer
    for name, data in files.items():
        (folder / name).write_bytes(data)


SHARD_BYTES = 5 * 1024**3  # shard an HF export past this size, as transformers does


def save_hf(
    folder: Path,
    cfg: GemmaConfig,
    state: dict[str, torch.Tensor],
    tokenizer_proto: bytes | dict[str, bytes],
    token_ids: dict[str, int],
    dtype: torch.dtype | None = None,
    force: bool = False,
    shard_bytes: int = SHARD_BYTES,
    tokenizer_config: dict | None = None,
) -> None:
    """An HF folder that transformers loads: config.json (hub shape), model.safetensors (sharded with an index
    past `shard_bytes`), the tokenizer (tokenizer.model or tokenizer.json, and with `tokenizer_config` its
    tokenizer_config.json) and generation_config.json."""
    names = hf_names(cfg)
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise GemmaError(f"cannot export tensor {unknown[0]!r}: it has no HF name")
    tensors = {names[k]: v for k, v in _contiguous(state, dtype).items()}
    torch_dtype = next(iter(tensors.values())).dtype
    with atomic_dir(folder, force) as tmp:
        shards: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for key, t in tensors.items():
            nbytes = t.numel() * t.element_size()
            if shards[-1] and size + nbytes > shard_bytes:
                shards.append({})
                size = 0
            shards[-1][key] = t
            size += nbytes
        if len(shards) == 1:
            save_safetensors(shards[0], tmp / "model.safetensors")
        else:
            weight_map = {}
            for i, shard in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(shard, tmp / name)
                weight_map.update(dict.fromkeys(shard, name))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(
                tmp / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
            )
        hf_cfg = to_hf_config(cfg, **{k: token_ids[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
        hf_cfg["torch_dtype"] = str(torch_dtype).removeprefix("torch.")
        write_json(tmp / "config.json", hf_cfg)
        write_json(
            tmp / "generation_config.json",
            {
                "bos_token_id": token_ids["bos_token_id"],
                # Every id that ends a reply: <eos> and the end-of-turn marker (Gemma 4: also <|tool_response>).
                "eos_token_id": list(
                    token_ids.get("stop_ids")
                    or [token_ids["eos_token_id"], token_ids.get("end_of_turn_id", token_ids["eos_token_id"])]
                ),
                "pad_token_id": token_ids["pad_token_id"],
            },
        )
        write_tokenizer(tmp, tokenizer_proto)
        if tokenizer_config is not None:  # what transformers' tokenizer needs to add <bos> and chat as we do
            write_json(tmp / "tokenizer_config.json", tokenizer_config)
