"""The data files of a hub dataset's config and split: `--data org/name[:config[:split]]`.

The local HF cache first (laid out as huggingface-hub lays it: `datasets--org--name/snapshots/...`), then the hub,
downloading only the files of the split asked for. Which files make which split follows the hub's own rules, the
ones its dataset viewer and `datasets` apply:
- the dataset card's `configs:` (README.md front matter): each config's `data_files`, a pattern or a list of
  `{split, path}` entries, globs relative to the repo root;
- else, with no card configs, one config ("default"), its files split by name: a folder or a file-name word `train`
  (or `training`), `validation` (`valid`, `val`, `dev`), `test` (`testing`, `eval`); when no file names a split, every
  data file is train. The parquet conversion's `CONFIG/SPLIT/NNNN.parquet` makes each top folder a config.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path, PurePosixPath

from gemma.errors import GemmaError
from train.records import DATA_SUFFIXES

CARD = "README.md"
DATA_PATTERNS = [f"*{suffix}" for suffix in DATA_SUFFIXES]
SPLIT_WORDS = {
    "train": "train",
    "training": "train",
    "validation": "validation",
    "valid": "validation",
    "val": "validation",
    "dev": "validation",
    "test": "test",
    "testing": "test",
    "eval": "test",
}
SPLIT_ORDER = ("train", "validation", "test")


def hub_data_files(repo_id: str, config: str | None = None, split: str | None = None) -> list[Path]:
    """The local paths of the files of `repo_id`'s config and split (the default config, the train split), sorted;
    a one-line error when the dataset cannot be had or has no such config or split."""
    from gemma.formats.load import check_repo_id

    check_repo_id(repo_id)
    cached = _cached(repo_id)
    if cached is not None:
        listing = _listing(cached)
        try:
            return [cached / name for name in pick_files(repo_id, listing, _card(cached), config, split)]
        except GemmaError:
            if _offline():
                raise
            # The cache may hold another split only: the hub has the whole dataset.
    return _download(repo_id, config, split)


def pick_files(repo_id: str, listing: list[str], card: dict, config: str | None, split: str | None) -> list[str]:
    """The repo-relative names, of `listing`, that make `config`'s `split` (None: the defaults)."""
    configs = dataset_configs(listing, card)
    if not configs:
        raise GemmaError(f"{repo_id}: the dataset has no data files ({', '.join(DATA_SUFFIXES)})")
    name = config or _default_config(repo_id, configs, card)
    if name not in configs:
        raise GemmaError(f"{repo_id}: no config {name!r} (configs: {', '.join(configs)})")
    splits = configs[name]
    wanted = SPLIT_WORDS.get(split, split) if split else _default_split(repo_id, name, splits)
    if wanted not in splits or not splits[wanted]:
        have = ", ".join(s for s in splits if splits[s]) or "none with data files"
        raise GemmaError(f"{repo_id}: config {name!r} has no split {split or wanted!r} (splits: {have})")
    return splits[wanted]


def dataset_configs(listing: list[str], card: dict) -> dict[str, dict[str, list[str]]]:
    """{config: {split: [file, ...]}} of a repo's file listing and card metadata."""
    data = sorted(name for name in listing if name.lower().endswith(DATA_SUFFIXES) and not _hidden(name))
    declared = card.get("configs")
    if isinstance(declared, list) and declared:
        configs = {}
        for entry in declared:
            if isinstance(entry, dict):
                name = str(entry.get("config_name", "default"))
                configs[name] = _declared_splits(entry.get("data_files"), data)
        return configs
    by_folder = _conversion_layout(data)
    if by_folder:
        return by_folder
    return {"default": split_by_name(data)} if data else {}


def split_by_name(files: list[str]) -> dict[str, list[str]]:
    """Files by the split their folder or file-name words name; every file is train when none names one."""
    splits: dict[str, list[str]] = {}
    for name in files:
        found = _named_split(name)
        if found:
            splits.setdefault(found, []).append(name)
    if not splits:
        return {"train": list(files)}
    return {s: splits[s] for s in sorted(splits, key=_split_rank)}


def _named_split(name: str) -> str | None:
    path = PurePosixPath(name)
    for folder in path.parts[:-1]:
        if folder.lower() in SPLIT_WORDS:
            return SPLIT_WORDS[folder.lower()]
    for word in re.split(r"[^a-z]+", path.name.lower()):
        if word in SPLIT_WORDS:
            return SPLIT_WORDS[word]
    return None


def _split_rank(split: str) -> tuple[int, str]:
    return (SPLIT_ORDER.index(split) if split in SPLIT_ORDER else len(SPLIT_ORDER), split)


def _declared_splits(data_files, data: list[str]) -> dict[str, list[str]]:
    """A card config's `data_files` (a pattern, a list of patterns, a list of {split, path}, or {split: path})."""
    if isinstance(data_files, dict):
        data_files = [{"split": k, "path": v} for k, v in data_files.items()]
    if data_files is None:
        data_files = []
    elif isinstance(data_files, str):
        data_files = [data_files]
    splits: dict[str, list[str]] = {}
    for entry in data_files:
        split, patterns = (
            (entry.get("split", "train"), entry.get("path")) if isinstance(entry, dict) else ("train", entry)
        )
        patterns = [patterns] if isinstance(patterns, str) else list(patterns or [])
        matched = splits.setdefault(str(split), [])
        for pattern in patterns:
            matched += [name for name in data if _matches(str(pattern), name) and name not in matched]
    return splits


def _matches(pattern: str, name: str) -> bool:
    """A card's glob (`*` within a folder, `**` across folders) against a repo-relative name; a bare folder
    matches every file under it."""
    pattern = pattern.strip().lstrip("./").rstrip("/")
    if name.startswith(pattern + "/"):
        return True
    regex = ""
    for piece in re.split(r"(\*\*/?|\*|\?)", pattern):
        if piece.startswith("**"):
            regex += "(?:.*/)?" if piece.endswith("/") else ".*"
        elif piece == "*":
            regex += "[^/]*"
        elif piece == "?":
            regex += "[^/]"
        else:
            regex += re.escape(piece)
    return re.fullmatch(regex, name) is not None


def _conversion_layout(data: list[str]) -> dict[str, dict[str, list[str]]]:
    """The parquet conversion's CONFIG/SPLIT/FILE layout, when every data file sits in it; else {}."""
    configs: dict[str, dict[str, list[str]]] = {}
    for name in data:
        parts = PurePosixPath(name).parts
        if len(parts) != 3 or parts[1].lower() not in SPLIT_WORDS or parts[0].lower() in SPLIT_WORDS:
            return {}
        configs.setdefault(parts[0], {}).setdefault(parts[1], []).append(name)
    return configs


def _default_config(repo_id: str, configs: dict, card: dict) -> str:
    for entry in card.get("configs") or []:
        if isinstance(entry, dict) and entry.get("default") is True:
            return str(entry.get("config_name", "default"))
    if "default" in configs or len(configs) == 1:
        return "default" if "default" in configs else next(iter(configs))
    raise GemmaError(
        f"{repo_id}: the dataset has several configs ({', '.join(configs)}); name one: {repo_id}:CONFIG[:SPLIT]"
    )


def _default_split(repo_id: str, config: str, splits: dict) -> str:
    if "train" in splits or len(splits) != 1:
        return "train"
    return next(iter(splits))


def _hidden(name: str) -> bool:
    return any(part.startswith(".") for part in PurePosixPath(name).parts)


def _listing(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def _card(folder: Path) -> dict:
    """The dataset card's YAML metadata ({} without a card or with a card that has none)."""
    card = folder / CARD
    if not card.is_file():
        return {}
    from huggingface_hub.repocard import metadata_load

    try:
        return metadata_load(card) or {}
    except Exception as exc:  # malformed YAML: the card is the repo owner's text, not ours to trust
        raise GemmaError(
            f"{card}: the dataset card's metadata is not readable YAML ({str(exc).splitlines()[0]})"
        ) from None


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _cached(repo_id: str) -> Path | None:
    """The cached snapshot of the dataset's main revision, or None."""
    import huggingface_hub
    from huggingface_hub.errors import LocalEntryNotFoundError

    with contextlib.suppress(LocalEntryNotFoundError, FileNotFoundError, OSError):
        return Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", local_files_only=True))
    return None


def _download(repo_id: str, config: str | None, split: str | None) -> list[Path]:
    """From the hub: the file listing and card first, then only the chosen split's files."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError

    unreachable = f"{repo_id}: not in the local HF cache and the hub cannot be reached"
    if _offline():
        raise GemmaError(unreachable + " (HF_HUB_OFFLINE is set)")
    try:
        info = huggingface_hub.HfApi().dataset_info(repo_id)
        listing = [sibling.rfilename for sibling in info.siblings or []]
        card = {}
        if CARD in listing:
            card_folder = huggingface_hub.snapshot_download(repo_id, repo_type="dataset", allow_patterns=[CARD])
            card = _card(Path(card_folder))
        chosen = pick_files(repo_id, listing, card, config, split)
        folder = Path(huggingface_hub.snapshot_download(repo_id, repo_type="dataset", allow_patterns=[*chosen, CARD]))
    except GemmaError:
        raise
    except HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", None)
        if status == 404:
            raise GemmaError(f"{repo_id}: no such dataset on the hub") from None
        hint = " (a gated dataset: accept its terms on the hub and run `hf auth login`)" if status in (401, 403) else ""
        raise GemmaError(f"{repo_id}: the hub refused the download: {str(exc).splitlines()[0]}{hint}") from None
    except Exception as exc:  # no network: huggingface-hub's HTTP client raises its own connection errors
        raise GemmaError(f"{unreachable} ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return [folder / name for name in chosen]
