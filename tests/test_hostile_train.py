"""`python -m train.sft` against a user's mistakes and a hostile environment: bad flags, tampered checkpoints,
damaged or strange files, a full or read-only disk, leftovers of a killed run, a terminal that cannot show the
output. Each mistake ends with exit status 2 and one `error:` line of its own (no traceback), and what was already
written stays as it was."""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma.errors import GemmaError
from train.checkpoint import load_checkpoint, rank_file, recover, rng_state, set_rng_state
from train.data import read_records, shard
from train.options import parse_options

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "examples" / "arith_train.jsonl"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
DEMO_PROMPT = "小明有13个苹果，又买了9个，现在一共有多少个苹果？"


def sft(*args, env: dict | None = None, script: Path | None = None) -> subprocess.CompletedProcess:
    target = [str(script)] if script else ["-m", "train.sft"]
    return subprocess.run(
        [sys.executable, *target, *map(str, args)],
        capture_output=True,
        text=True,
        env={**ENV, **(env or {})},
        cwd=ROOT,
        timeout=300,
    )


def error_line(run: subprocess.CompletedProcess, alone: bool = True) -> str:
    """The one `error:` line of a failed run: exit status 2, no traceback, the line at the start of a line of its
    own (not glued to a progress bar) and, with `alone`, all there is on stderr."""
    assert run.returncode == 2, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    lines = [line for line in run.stderr.split("\n") if "error:" in line]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.stderr[-3000:]
    if alone:
        assert run.stderr == lines[0] + "\n", run.stderr[-3000:]
    return lines[0]


def files(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` with its bytes: what must not change."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"{name} is not JSON")

    return json.loads(text, parse_constant=refuse)


def leftovers(folder: Path) -> list[str]:
    """Temporary files and folders (names starting with a dot) anywhere under `folder`."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob(".*"))


@pytest.fixture(scope="module")
def common(tiny_folder) -> list:
    return ["--model", tiny_folder, "--data", ARITH, "--batch-size", 2, "--lora-r", 4, "--save-every", 1]


@pytest.fixture(scope="module")
def finished(common, tmp_path_factory) -> Path:
    """A finished 2-step run with checkpoints at steps 1 and 2 (tests work on copies)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    run = sft(*common, "--max-steps", 2, "--out", out)
    assert run.returncode == 0, run.stderr
    return out


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ---- checkpoints hold no code ---------------------------------------------------------------------------------------


class _Planted:
    """Pickles as a call of open(path, "w"): loading it with pickle creates the file."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_tampered_checkpoint_is_refused_and_its_code_never_runs(common, run_copy, tmp_path):
    marker = tmp_path / "planted-code-ran"
    state_file = run_copy / "checkpoints" / "step-0000002" / "state.pt"
    saved = torch.load(state_file, weights_only=True)
    torch.save({**saved, "extra": _Planted(marker)}, state_file)
    before = files(run_copy)
    line = error_line(sft(*common, "--max-steps", 3, "--out", run_copy, "--resume"))
    assert line.startswith(f"error: {state_file}: refused: holds more than tensors and plain data (io.open)")
    assert not marker.exists()
    assert files(run_copy) == before
    torch.load(state_file, weights_only=False)  # what --resume used to do: the planted call runs
    assert marker.exists()


def test_a_tampered_per_process_file_is_refused(tmp_path):
    marker = tmp_path / "planted-code-ran"
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    torch.save({"run": {}}, folder / "state.pt")
    torch.save({"rng": _Planted(marker)}, folder / rank_file(1))
    with pytest.raises(GemmaError, match=r"rank-00001\.pt: refused"):
        load_checkpoint(folder, rank=1)
    assert not marker.exists()


class _Shell:
    """Pickles as os.system(COMMAND): torch words its refusal of a blocked module differently from that of a
    function it merely does not allow (open above)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_checkpoint_that_calls_a_shell_is_refused_without_torch_advice(tmp_path):
    marker = tmp_path / "shell-ran"
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    torch.save({"run": _Shell(f"touch {marker}")}, folder / "state.pt")
    with pytest.raises(GemmaError) as caught:
        load_checkpoint(folder)
    message = str(caught.value)
    assert "refused: holds more than tensors and plain data (posix.system)" in message
    assert "weights_only" not in message  # torch's own advice is to load it unsafely: never passed on
    assert not marker.exists()


def test_a_garbage_checkpoint_is_corrupt(tmp_path):
    folder = tmp_path / "step-0000001"
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"\x80\x02garbage" * 10)
    with pytest.raises(GemmaError, match=r"state\.pt: cannot read the checkpoint \(corrupt"):
        load_checkpoint(folder)


def test_rng_state_is_plain_data_and_restores_exactly():
    state = rng_state()
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    draws = (torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist())
    set_rng_state(torch.load(buffer, weights_only=True))
    assert (torch.rand(4).tolist(), random.random(), np.random.rand(3).tolist()) == draws


def test_a_checkpoint_that_loads_but_is_not_ours(common, run_copy):
    state_file = run_copy / "checkpoints" / "step-0000002" / "state.pt"
    torch.save({"layout": {"world": 1, "sharded": False}, "run": {"step": 2}}, state_file)
    before = files(run_copy)
    line = error_line(sft(*common, "--max-steps", 3, "--out", run_copy, "--resume"))
    assert "step-0000002: not a checkpoint this run can resume" in line
    assert files(run_copy) == before


def test_a_checkpoint_file_that_is_a_folder_is_named_once(tmp_path):
    (tmp_path / "state.pt").mkdir()
    with pytest.raises(GemmaError) as info:
        load_checkpoint(tmp_path)
    assert str(info.value) == f"{tmp_path / 'state.pt'}: is a folder, not a checkpoint"


# ---- flags that would quietly train something else ---------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--max-grad-norm", "-1"], "--max-grad-norm"),
        (["--max-grad-norm", "nan"], "--max-grad-norm"),
        (["--min-lr-ratio", "-5"], "--min-lr-ratio"),
        (["--min-lr-ratio", "1.5"], "--min-lr-ratio"),
        (["--lr", "inf"], "--lr"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "0"], "--lr"),
        (["--lr", "abc"], "--lr"),
        (["--epochs", "inf"], "--epochs"),
        (["--epochs", "nan"], "--epochs"),
        (["--epochs", "1e308"], "--epochs"),
        (["--weight-decay", "-0.1"], "--weight-decay"),
        (["--weight-decay", "nan"], "--weight-decay"),
        (["--lora-alpha", "nan"], "--lora-alpha"),
        (["--lora-alpha", "0"], "--lora-alpha"),
        (["--lora-dropout", "nan"], "--lora-dropout"),
        (["--warmup-ratio", "nan"], "--warmup-ratio"),
        (["--eval-split", "inf"], "--eval-split"),
        (["--save-every", "-1"], "--save-every"),
        (["--eval-every", "-1"], "--eval-every"),
        (["--eval-generate", "-1"], "--eval-generate"),
        (["--seed", "-1"], "--seed"),
        (["--seed", str(2**32)], "--seed"),
        (["--dist-timeout", str(10**12)], "--dist-timeout"),
        (["--chat-prompt", "\udcff"], "--chat-prompt"),  # a byte that is not UTF-8 in argv
    ],
)
def test_flags_that_change_the_run_are_refused(argv, flag):
    with pytest.raises(GemmaError, match=re.escape(flag)) as info:
        parse_options(argv)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    "name, text, expected",
    [
        ("c.json", '{"lr": NaN}', "NaN is not JSON"),
        ("c.yaml", "lr: .nan\n", "--lr must be a finite number"),
        ("c.yaml", "max_grad_norm: -1\n", "--max-grad-norm"),
        ("c.yaml", "max_steps: 1e400\n", "option 'max_steps' must be int"),
        ("c.yaml", "seed: 18446744073709551616\n", "--seed"),
        ("c.json", "[" * 100_000 + "]" * 100_000, "nested deeper"),
        ("c.yaml", "[" * 100_000 + "]" * 100_000, "not valid YAML"),
    ],
)
def test_bad_config_files_are_refused(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(GemmaError, match=re.escape(expected)):
        parse_options(["--config", str(path)])


def test_a_huge_grad_accum_costs_no_more_than_the_data():
    # Micro-batches past the data are empty and left out; shard() stops there instead of counting to --grad-accum.
    assert shard(list(range(5)), 1, 2, 10**15) == [[1], [3]]


def test_limits_themselves_are_accepted():
    opts = parse_options(
        [
            "--seed",
            str(2**32 - 1),
            "--max-grad-norm",
            "0",
            "--min-lr-ratio",
            "1",
            "--save-every",
            "0",
            "--max-len",
            str(10**12),
        ]
    )
    assert opts.seed == 2**32 - 1 and opts.max_len == 10**12


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["--lr", "nan"], "error: --lr must be a finite number, got nan"),
        (["--lr", "abc"], "error: argument --lr: invalid float value: 'abc'"),
        (["--device", "bogus"], "error: --device bogus: "),
        pytest.param(
            ["--device", "cuda"],
            "error: --device cuda: CUDA is not available",
            marks=pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA"),
        ),
    ],
)
def test_flag_errors_are_one_line(tiny_folder, tmp_path, argv, expected):
    run = sft("--model", tiny_folder, "--data", ARITH, "--max-steps", 1, *argv, "--out", tmp_path / "run")
    assert error_line(run).startswith(expected)
    assert not (tmp_path / "run").exists()


def test_a_lora_rank_above_a_projection_width(tiny_folder, tmp_path):
    # The tiny model's k and v projections are 64 in, 32 out (2 kv heads of 16).
    run = sft("--model", tiny_folder, "--data", ARITH, "--max-steps", 1, "--lora-r", 40, "--out", tmp_path / "run")
    line = error_line(run)
    assert "--lora-r 40 is above the width 32 of layers.0.attn.k (64 in, 32 out)" in line


# ---- files that are not what they seem -----------------------------------------------------------------------------


def _data_file(kind: str, tmp_path: Path) -> tuple[list, str]:
    """(flags, expected part of the error) for one kind of strange input file."""
    good = '{"instruction": "1+1", "output": "2"}\n'
    if kind == "lone surrogate":
        path = tmp_path / "d.jsonl"
        path.write_text(good + '{"instruction": "a\\ud800b", "output": "c"}\n')
        return ["--data", path], f"{path}:2: holds a lone UTF-16 surrogate"
    if kind == "deep JSON":
        path = tmp_path / "d.jsonl"
        path.write_text(good + "[" * 100_000 + "]" * 100_000 + "\n")
        return ["--data", path], f"{path}:2: JSON nested deeper than 64 levels"
    if kind == "FIFO":
        path = tmp_path / "fifo.jsonl"
        os.mkfifo(path)
        return ["--data", path], f"{path}: is a FIFO, not a data file"
    if kind == "/dev/zero eval":
        return ["--eval-data", "/dev/zero"], "/dev/zero: is a device, not a data file"
    if kind == "/dev/zero config":
        return ["--config", "/dev/zero"], "/dev/zero: is a device, not a config file"
    raise ValueError(kind)


@pytest.mark.parametrize("kind", ["lone surrogate", "deep JSON", "FIFO", "/dev/zero eval", "/dev/zero config"])
def test_strange_input_files_are_one_line(tiny_folder, tmp_path, kind):
    if kind == "FIFO" and not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs here")
    flags, expected = _data_file(kind, tmp_path)
    run = sft("--model", tiny_folder, "--data", ARITH, *flags, "--max-steps", 1, "--out", tmp_path / "run")
    assert error_line(run).startswith(f"error: {expected}")


def test_surrogate_pairs_are_text_and_deep_json_lists_are_refused(tmp_path):
    pair = tmp_path / "pair.jsonl"
    pair.write_text('{"instruction": "\\ud83d\\ude00", "output": "ok"}\n')
    assert read_records(pair)[0]["instruction"] == "\U0001f600"
    deep = tmp_path / "deep.json"
    deep.write_text("[" + "[" * 100_000 + "]" * 100_000 + "]")
    with pytest.raises(GemmaError, match=rf"^{re.escape(str(deep))}: JSON nested deeper"):
        read_records(deep)


# ---- a full or read-only disk --------------------------------------------------------------------------------------

FULL_DISK = r'''
"""train.sft on a disk that fills up while a file whose path matches argv[1] is written: half of the write lands,
then ENOSPC (safetensors reports it as its own SafetensorError, as it does on a real full disk)."""
import builtins, errno, io, re, sys

import safetensors.torch
from safetensors import SafetensorError

pattern = re.compile(sys.argv.pop(1))
real_open, real_save = io.open, safetensors.torch.save_file


class Full:
    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        raise OSError(errno.ENOSPC, "No space left on device")

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def full_open(file, mode="r", *args, **kwargs):
    f = real_open(file, mode, *args, **kwargs)
    return Full(f) if set(mode) & set("wax") and pattern.search(str(file)) else f


def full_save(tensors, filename, metadata=None):
    if pattern.search(str(filename)):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    return real_save(tensors, filename, metadata)


builtins.open = io.open = full_open
safetensors.torch.save_file = full_save
from train.sft import main

sys.exit(main())
'''


@pytest.mark.parametrize(
    "pattern, named",
    [
        (r"/\.config\.json\.tmp-\d+$", "/run/config.json: cannot write"),
        (r"/metrics\.jsonl$", "/run/metrics.jsonl: cannot write the metrics"),
        (r"/state\.pt$", "/run/checkpoints/step-0000001: cannot write the checkpoint"),
        (r"/run/\.adapter\.tmp-\d+/adapter_model\.safetensors$", "/run/adapter: cannot write the adapter"),
        (r"/\.loss\.png\.tmp\.png$", "/run/loss.png: cannot write the loss plot"),
        (r"/\.report\.json\.tmp-\d+$", "/run/report.json: cannot write"),
    ],
)
def test_a_full_disk_is_one_line_and_leaves_no_half_written_file(common, tmp_path, pattern, named):
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    out = tmp_path / "run"
    line = error_line(sft(pattern, *common, "--max-steps", 2, "--out", out, script=script), alone=False)
    assert named in line and line.lower().endswith("(no space left on device)")
    assert leftovers(out) == []
    if (out / "metrics.jsonl").exists():
        for text in (out / "metrics.jsonl").read_text().splitlines():
            strict_json(text)
    for folder in (out / "checkpoints").glob("step-*"):
        assert torch.load(folder / "state.pt", weights_only=True)["run"]["step"] == int(folder.name[5:])


@pytest.mark.parametrize("size", ["4k", "40k"])  # full at the first metrics line, at the first checkpoint
def test_a_real_full_disk(common, tmp_path, size):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = (
        os.geteuid() == 0
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(disk)], capture_output=True
        ).returncode
        == 0
    )
    if not mounted:
        pytest.skip("cannot mount a small tmpfs here")
    try:
        line = error_line(sft(*common, "--max-steps", 2, "--out", disk / "run"), alone=False)
        assert line.endswith("(No space left on device)")
        assert leftovers(disk) == []
    finally:
        subprocess.run(["umount", str(disk)], check=True)


@contextlib.contextmanager
def read_only(folder: Path):
    """`folder` made read-only for this user: by permissions, or for root (whom permissions do not stop) by a
    read-only bind mount of it over itself; skips the test where neither is possible."""
    if os.geteuid() != 0:
        dirs = [folder, *(p for p in folder.rglob("*") if p.is_dir())]
        for p in dirs:
            p.chmod(0o555)
        try:
            yield
        finally:
            for p in dirs:
                p.chmod(0o755)
        return
    mount = subprocess.run(["mount", "--bind", str(folder), str(folder)], capture_output=True)
    if mount.returncode != 0:
        pytest.skip("root, and no read-only bind mount here")
    try:
        if subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("root, and no read-only bind mount here")
        yield
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_a_read_only_output_folder(common, run_copy, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked):
        line = error_line(sft(*common, "--max-steps", 1, "--out", locked / "run"))
    assert line.startswith(f"error: {locked / 'run'}: cannot write the output folder")
    before = files(run_copy)
    with read_only(run_copy):
        line = error_line(sft(*common, "--max-steps", 3, "--out", run_copy, "--resume"))
    assert line.startswith(f"error: {run_copy}: cannot write the output folder")
    assert files(run_copy) == before


# ---- what a killed run leaves ----------------------------------------------------------------------------------------


def _checkpoint(folder: Path, complete: bool = True) -> Path:
    (folder / "adapter").mkdir(parents=True)
    if complete:
        (folder / "state.pt").write_bytes(b"state")
    return folder


def test_recover_removes_leftovers_and_restores_a_checkpoint_renamed_aside(tmp_path):
    root = tmp_path / "checkpoints"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = os.getppid()
    _checkpoint(root / "step-0000001")
    _checkpoint(root / ".step-0000001.tmp", complete=False)  # a torchrun save killed while writing
    _checkpoint(root / ".step-0000001.old")  # killed after the second rename
    _checkpoint(root / ".step-0000002.old")  # killed between the two renames: the newest checkpoint
    _checkpoint(root / f".step-0000003.tmp-{gone.pid}", complete=False)  # atomic_dir, its process gone
    _checkpoint(root / f".step-0000003.old-{gone.pid}", complete=False)
    _checkpoint(root / f".step-0000004.tmp-{alive}", complete=False)  # a save still under way: kept
    (root / "notes.txt").write_text("not ours")
    recover(tmp_path)
    assert sorted(p.name for p in root.iterdir()) == [
        f".step-0000004.tmp-{alive}",
        "notes.txt",
        "step-0000001",
        "step-0000002",
    ]
    assert (root / "step-0000002" / "state.pt").read_bytes() == b"state"


def test_resume_after_a_kill_between_the_renames(common, run_copy):
    root = run_copy / "checkpoints"
    os.replace(root / "step-0000002", root / ".step-0000002.old")
    (root / ".step-0000003.tmp").mkdir()
    (root / ".step-0000003.tmp" / ".state.pt.part").write_bytes(b"half")
    run = sft(*common, "--max-steps", 3, "--out", run_copy, "--resume")
    assert run.returncode == 0, run.stderr
    assert f"resumed from {root / 'step-0000002'} at step 2" in run.stdout
    assert [strict_json(x)["step"] for x in (run_copy / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert leftovers(run_copy) == []


# ---- metrics.jsonl after a crash, and JSON the run writes ----------------------------------------------------------


def test_a_metrics_line_cut_by_a_crash_is_dropped_on_resume(common, run_copy):
    metrics = run_copy / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"step": 3, "epoch": 0.01, "lo')
    run = sft(*common, "--max-steps", 3, "--out", run_copy, "--resume")
    assert run.returncode == 0, run.stderr
    assert [strict_json(x)["step"] for x in metrics.read_text().splitlines()] == [1, 2, 3]


def test_a_damaged_metrics_line_before_the_last_is_an_error(common, run_copy):
    metrics = run_copy / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("".join(x + "\n" for x in ['{"step": 1, "lo', *lines[1:]]))
    before = files(run_copy)
    line = error_line(sft(*common, "--max-steps", 3, "--out", run_copy, "--resume"))
    assert line.startswith(f"error: {metrics}:1: not a metrics line")
    assert files(run_copy) == before


def test_non_finite_values_are_written_as_null_and_the_error_line_follows_the_bar(common, tmp_path):
    # An absurd learning rate: step 1 trains, its update blows the adapter up, steps 2 and 3 are NaN, and the run
    # stops with a user error while the progress bar is live.
    out = tmp_path / "run"
    run = sft(*common, "--max-steps", 6, "--lr", 1e30, "--precision", "fp32", "--warmup-ratio", 0, "--out", out)
    assert "non-finite loss at 2 steps in a row" in error_line(run, alone=False)
    assert "train:" in run.stderr  # the bar was there, and the error line still starts a line
    records = [strict_json(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[1]["loss"] is None and records[1]["grad_norm"] is None
    strict_json((out / "config.json").read_text())


def test_a_terminal_that_cannot_show_the_reply(tiny_folder, tmp_path):
    # An ASCII stdout and the Chinese chat prompt: report.json is written before anything is shown, and what is
    # shown is escaped. An absurd --max-len is clamped to the model's context, with a note.
    out = tmp_path / "run"
    run = sft(
        "--model",
        tiny_folder,
        "--data",
        ARITH,
        "--max-steps",
        1,
        "--lora-r",
        4,
        "--out",
        out,
        "--chat-prompt",
        DEMO_PROMPT,
        "--max-len",
        10**12,
        env={"PYTHONIOENCODING": "ascii"},
    )
    assert run.returncode == 0, run.stderr
    report = strict_json((out / "report.json").read_text(encoding="utf-8"))
    assert report["chat"]["prompt"] == DEMO_PROMPT
    assert "\\u5c0f" in run.stdout or "\\xe5" in run.stdout
    assert "note: --max-len 1000000000000 is above the model's context of 256 tokens" in run.stdout
    assert strict_json((out / "config.json").read_text())["resolved"]["max_len"] == 256
