"""Hub datasets' files by config and split, from a local HF cache laid out as huggingface-hub lays it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gemma.errors import GemmaError
from train.hub_data import dataset_configs, hub_data_files, split_by_name

COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROW = json.dumps({"instruction": "a", "output": "b"}) + "\n"


def fake_dataset(cache: Path, repo: str, files: dict[str, str]) -> Path:
    """A cached snapshot of a dataset repo: refs/main naming a snapshot folder that holds `files`."""
    folder = cache / f"datasets--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text(COMMIT)
    snapshot = folder / "snapshots" / COMMIT
    for name, text in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).write_text(text)
    return snapshot


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "hub"


def names(paths: list[Path], snapshot: Path) -> list[str]:
    return [p.relative_to(snapshot).as_posix() for p in paths]


def test_splits_by_file_and_folder_names(cache):
    snap = fake_dataset(
        cache,
        "org/plain",
        {
            "data/train-00000-of-00002.parquet": "",
            "data/train-00001-of-00002.parquet": "",
            "data/validation-00000-of-00001.parquet": "",
            "test/part.jsonl": ROW,
            "README.md": "# no metadata\n",
        },
    )
    assert names(hub_data_files("org/plain"), snap) == [
        "data/train-00000-of-00002.parquet",
        "data/train-00001-of-00002.parquet",
    ]
    assert names(hub_data_files("org/plain", None, "validation"), snap) == ["data/validation-00000-of-00001.parquet"]
    assert names(hub_data_files("org/plain", None, "val"), snap) == ["data/validation-00000-of-00001.parquet"]
    assert names(hub_data_files("org/plain", "default", "test"), snap) == ["test/part.jsonl"]


def test_files_that_name_no_split_are_all_train(cache):
    snap = fake_dataset(cache, "org/alpaca", {"alpaca_data.json": "[]", "extra/more.jsonl": ROW, "notes.txt": "x"})
    assert names(hub_data_files("org/alpaca"), snap) == ["alpaca_data.json", "extra/more.jsonl"]


def test_card_configs_choose_the_files(cache):
    card = """---
license: mit
configs:
- config_name: en
  data_files:
  - split: train
    path: "english/*.jsonl"
  - split: test
    path: english/held/**
- config_name: zh
  default: true
  data_files: chinese/train.parquet
---
# A card
"""
    snap = fake_dataset(
        cache,
        "org/multi",
        {
            "README.md": card,
            "english/a.jsonl": ROW,
            "english/b.jsonl": ROW,
            "english/held/deep/c.jsonl": ROW,
            "chinese/train.parquet": "",
            "chinese/test.parquet": "",
        },
    )
    assert names(hub_data_files("org/multi"), snap) == ["chinese/train.parquet"]  # the default config
    assert names(hub_data_files("org/multi", "en"), snap) == ["english/a.jsonl", "english/b.jsonl"]
    assert names(hub_data_files("org/multi", "en", "test"), snap) == ["english/held/deep/c.jsonl"]
    with pytest.raises(GemmaError, match=r"org/multi: no config 'fr' \(configs: en, zh\)"):
        hub_data_files("org/multi", "fr")
    with pytest.raises(GemmaError, match=r"config 'zh' has no split 'test' \(splits: train\)"):
        hub_data_files("org/multi", None, "test")


def test_parquet_conversion_layout_makes_configs():
    listing = ["plain_text/train/0000.parquet", "plain_text/test/0000.parquet", "other/train/0000.parquet"]
    assert dataset_configs(listing, {}) == {
        "other": {"train": ["other/train/0000.parquet"]},
        "plain_text": {"test": ["plain_text/test/0000.parquet"], "train": ["plain_text/train/0000.parquet"]},
    }


def test_several_configs_and_no_default_asks_for_one(cache):
    fake_dataset(cache, "org/two", {"a/train/0.parquet": "", "b/train/0.parquet": ""})
    with pytest.raises(GemmaError, match=r"several configs \(a, b\); name one: org/two:CONFIG"):
        hub_data_files("org/two")
    assert hub_data_files("org/two", "b")[0].name == "0.parquet"


def test_split_words_are_whole_words():
    assert split_by_name(["data/contest.jsonl", "data/trainer.jsonl"]) == {
        "train": ["data/contest.jsonl", "data/trainer.jsonl"]
    }
    assert split_by_name(["dev.jsonl", "x_train.jsonl"]) == {"train": ["x_train.jsonl"], "validation": ["dev.jsonl"]}


def test_not_cached_and_offline_is_one_line(cache):
    with pytest.raises(GemmaError, match="org/absent: not in the local HF cache and the hub cannot be reached"):
        hub_data_files("org/absent")


def test_a_dataset_without_data_files(cache):
    fake_dataset(cache, "org/empty", {"README.md": "hello\n"})
    with pytest.raises(GemmaError, match="org/empty: the dataset has no data files"):
        hub_data_files("org/empty")


def test_from_the_hub_only_the_chosen_split_is_downloaded(cache, monkeypatch, tmp_path):
    """Not cached, online: the listing picks the files and only they (and the card) are downloaded."""
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    listing = ["README.md", "data/train-0.parquet", "data/test-0.parquet"]
    info = type("Info", (), {"siblings": [type("S", (), {"rfilename": n})() for n in listing]})()
    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", lambda self, repo_id: info)
    asked = []

    def snapshot_download(repo_id, repo_type=None, allow_patterns=None, local_files_only=False):
        assert repo_type == "dataset"
        if local_files_only:
            raise FileNotFoundError
        asked.append(sorted(allow_patterns))
        folder = tmp_path / "downloaded"
        (folder / "README.md").parent.mkdir(parents=True, exist_ok=True)
        (folder / "README.md").write_text("no metadata\n")
        return str(folder)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    got = hub_data_files("org/remote", None, "test")
    assert got == [tmp_path / "downloaded" / "data/test-0.parquet"]
    assert asked[-1] == ["README.md", "data/test-0.parquet"]


def test_no_network_is_one_line(cache, monkeypatch):
    import huggingface_hub
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)

    def unreachable(self, repo_id):
        raise ConnectionError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "dataset_info", unreachable)
    with pytest.raises(GemmaError, match=r"^org/x: not in the local HF cache and the hub cannot be reached \(\[Errno"):
        hub_data_files("org/x")
