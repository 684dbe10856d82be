"""What one `--data` value names: a local file or folder of shards, or a hub dataset, and its share of the mixture.

The syntax, `SOURCE[@WEIGHT | #COUNT]`:
- SOURCE: a local JSON / JSONL / Parquet / CSV / Arrow file, a folder of such files (every data file under it, in
  path order), or a hub dataset `org/name[:config[:split]]` (`org/name::test`: the default config's test split;
  the split defaults to train). A path that exists is a path, whatever characters it holds.
- `@WEIGHT` (a positive number): the source is sampled at that rate, WEIGHT x its examples per epoch. `@0.25` takes a
  seeded quarter of them, `@2` each twice, `@1.5` each once and a seeded half again.
- `#COUNT` (a positive whole number): that many of its examples per epoch, drawn the same way.
Without either, each example once. The draw is fixed by --seed, so every epoch, every rank and a resumed run see the
same mixture.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from gemma.errors import GemmaError
from train.records import DATA_SUFFIXES, iter_records, map_record

_SHARE = re.compile(r"^(?P<source>.+?)(?P<kind>[@#])(?P<value>[^@#/]*)$")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


@dataclass(frozen=True)
class Source:
    """One --data value, parsed."""

    spec: str  # as given
    path: Path | None  # a local file or folder; None for a hub dataset
    repo: str | None = None  # a hub dataset id
    config: str | None = None
    split: str | None = None
    weight: float | None = None  # @WEIGHT
    count: int | None = None  # #COUNT

    def files(self) -> list[Path]:
        """The data files it stands for, in a fixed order."""
        if self.repo is not None:
            from train.hub_data import hub_data_files

            return hub_data_files(self.repo, self.config, self.split)
        return local_files(self.path)

    def records(self, columns: dict[str, str]) -> Iterator[tuple[str, dict]]:
        """(where, record) of every record, its columns mapped."""
        for path in self.files():
            for where, record in iter_records(path):
                yield where, map_record(record, columns, where)

    def draws(self, n: int) -> float:
        """Examples of this source per epoch, of the `n` it has, as a multiple of n."""
        if self.count is not None:
            return self.count / n
        return 1.0 if self.weight is None else self.weight


def parse_source(spec: str, flag: str = "--data") -> Source:
    """A --data value as a Source; a malformed share or a name that is neither a path nor a hub id is one line."""
    spec = str(spec)
    if not spec.strip():
        raise GemmaError(f"{flag}: empty")
    if _exists(Path(spec)):
        return Source(spec, Path(spec))
    weight = count = None
    body = spec
    share = _SHARE.match(spec)
    if share:
        body, value = share["source"], share["value"]
        if share["kind"] == "@":
            weight = _weight(spec, value, flag)
        else:
            count = _count(spec, value, flag)
        if _exists(Path(body)):
            return Source(spec, Path(body), weight=weight, count=count)
    repo, _, rest = body.partition(":")
    config, _, split = rest.partition(":")
    looks_local = body.endswith(DATA_SUFFIXES) or body.startswith((".", "/", "~")) or repo.count("/") != 1
    if looks_local or not _HUB_ID.match(repo) or ":" in split:
        raise GemmaError(f"{flag} {spec}: no such file or folder, and not a hub dataset id (org/name[:config[:split]])")
    from gemma.formats.load import check_repo_id

    check_repo_id(repo)
    return Source(spec, None, repo, config or None, split or None, weight, count)


def _weight(spec: str, value: str, flag: str) -> float:
    try:
        weight = float(value)
    except ValueError:
        raise GemmaError(f"{flag} {spec}: the mixture weight {value!r} is not a number") from None
    if not (math.isfinite(weight) and weight > 0):
        raise GemmaError(f"{flag} {spec}: the mixture weight must be a positive number, got {value!r}")
    return weight


def _count(spec: str, value: str, flag: str) -> int:
    if not value.isdigit() or int(value) < 1:
        raise GemmaError(f"{flag} {spec}: the record count {value!r} is not a positive whole number")
    return int(value)


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def local_files(path: Path) -> list[Path]:
    """A file as itself; a folder as every data file under it (hidden ones aside), sorted by path."""
    if not path.is_dir():
        return [path]
    found = sorted(
        p
        for p in path.rglob("*")
        if p.suffix.lower() in DATA_SUFFIXES
        and p.is_file()
        and not any(part.startswith(".") for part in p.relative_to(path).parts)
    )
    if not found:
        raise GemmaError(f"{path}: a folder with no data file ({', '.join(DATA_SUFFIXES)}) in it")
    return found
