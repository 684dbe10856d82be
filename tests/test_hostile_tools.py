"""The command-line tools against hostile input and a hostile file system (issue 13).

The contract: a user's mistake ends the command with exit status 2 and one line on stderr that starts with `error:`,
no traceback, and nothing already written is lost or half-written. Each test runs the tool as a user does (a
subprocess) where that contract is the point, and compares every input and earlier output byte for byte before and
after. Covered: outputs that would replace an input, sampling settings at the edges of float32, full and read-only
file systems (patched in-process, and for real on a tiny tmpfs where the machine allows a private mount), bytes that
are not UTF-8, leftovers of killed writers (hand-made, and a real `kill -9` mid-write), FIFOs and devices given as
files.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from gemma import writing
from gemma.errors import GemmaError
from gemma.files import refuse_overwriting_inputs
from gemma.writing import clean_leftovers, exchange, install, write_files_atomically
from gemma.generation.sampling import (
    MIN_TEMPERATURE,
    SamplingParams,
    apply_repetition_penalty,
    check_settings,
    logits_to_probs,
    sample,
)
from gemma.generation.batch import generate
from gen_models import tiny_generator_folder
from tiny_gguf import write_tiny_gguf

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ROOT / "tools"
TIMEOUT = 180  # a check that is missing shows as a hang (a FIFO read never ends): fail instead


# ---- helpers ----------------------------------------------------------------------------------------------------


def run_tool(tool: str, *args, stdin=None, input=None) -> subprocess.CompletedProcess:
    """tools/TOOL.py ARGS as a user runs it (args may be bytes: what a shell passes for $'\\xff')."""
    cmd = [sys.executable, str(TOOLS / f"{tool}.py"), *[a if isinstance(a, bytes) else str(a) for a in args]]
    proc = subprocess.run(cmd, capture_output=True, stdin=stdin, input=input, timeout=TIMEOUT, cwd=ROOT)
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")
    )


def assert_error(run: subprocess.CompletedProcess, *words: str, alone: bool = True) -> str:
    """Exit status 2, exactly one `error:` line holding `words`, no traceback; with `alone`, nothing else on
    stderr (the refusals that come before any loading)."""
    assert run.returncode == 2, (run.returncode, run.stderr)
    assert "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, run.stderr
    if alone:
        assert run.stderr.strip().splitlines() == errors, run.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


def tree(path: Path) -> dict[str, str]:
    """Every file and folder under `path` (hidden ones too) -> the sha256 of its bytes ('dir' for a folder)."""
    path = Path(path)
    if path.is_file():
        return {".": hashlib.sha256(path.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(path.rglob("*")):
        if p.is_fifo():
            out[str(p.relative_to(path))] = "fifo"
        elif p.is_dir():
            out[str(p.relative_to(path))] = "dir"
        else:
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dead_pid() -> int:
    """A PID that no process has: one past the largest this system hands out."""
    try:
        return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1
    except (OSError, ValueError):
        proc = subprocess.Popen(["true"])
        proc.wait()
        return proc.pid


def mkfifo(path: Path) -> Path:
    if not hasattr(os, "mkfifo"):
        pytest.skip("no FIFOs on this system")
    os.mkfifo(path)
    return path


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory) -> Path:
    """A tiny native model folder (config.json, model.safetensors, tokenizer.model)."""
    return tiny_generator_folder("gemma3", tok, tmp_path_factory.mktemp("hostile"))


@pytest.fixture()
def data(tmp_path) -> Path:
    path = tmp_path / "d.jsonl"
    path.write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "Bye", "output": "Later"}\n')
    return path


# ---- 1. no output over an input ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "case", ["out-is-data", "predictions-is-data", "default-predictions-is-data", "out-in-model-folder"]
)
def test_evaluate_never_writes_over_its_inputs(case, model_dir, tmp_path):
    data = tmp_path / "e.predictions.jsonl"  # also what --out e.json names its predictions by default
    data.write_text('{"instruction": "Hi", "output": "Hello"}\n')
    model = tmp_path / "model"
    shutil.copytree(model_dir, model)
    out, extra = {
        "out-is-data": (data, []),
        "predictions-is-data": (tmp_path / "s.json", ["--predictions", data]),
        "default-predictions-is-data": (tmp_path / "e.json", []),
        "out-in-model-folder": (model / "config.json", []),
    }[case]
    before = tree(tmp_path)
    run = run_tool("evaluate", "--model", model, "--data", data, "--out", out, "--dtype", "fp32", *extra)
    assert_error(run, "would overwrite", "choose another path")
    assert tree(tmp_path) == before


def test_convert_never_writes_over_its_source(tmp_path, model_dir):
    gguf = tmp_path / "m.gguf"
    write_tiny_gguf(gguf)
    folder = tmp_path / "models" / "native"
    shutil.copytree(model_dir, folder)
    before = tree(tmp_path)
    for src, dst, word in (
        (gguf, gguf, "would overwrite the input SRC"),  # used to become a folder
        (folder, folder, "would overwrite the input SRC"),
        (folder, tmp_path / "models", "would overwrite the input SRC"),  # holds SRC
        (folder, folder / "model.safetensors", "would overwrite a file of the input SRC"),
        (folder, tmp_path, "would overwrite the input SRC"),
    ):
        run = run_tool("convert", src, dst, "--to", "hf", "--force")
        assert_error(run, word)
        assert tree(tmp_path) == before
    # Through a link to the source, too.
    link = tmp_path / "link.gguf"
    link.symlink_to(gguf)
    assert_error(run_tool("convert", gguf, link, "--to", "native", "--force"), "would overwrite")
    assert gguf.is_file() and link.is_symlink()


def test_refuse_overwriting_inputs_sees_through_names(tmp_path):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    os.link(folder / "a.json", tmp_path / "hard.json")
    for out in (tmp_path / "hard.json", tmp_path / "in" / ".." / "in", tmp_path / "in" / "a.json"):
        with pytest.raises(GemmaError, match="would overwrite"):
            refuse_overwriting_inputs({"--out": out}, {"--data": folder / "a.json", "--model": folder})
    # A new file, even inside an input folder, replaces nothing; a repo id or a preset is no local input.
    refuse_overwriting_inputs(
        {"--out": folder / "new.json", "--x": None}, {"--data": folder, "--model": "3-270m", "--adapter": None}
    )
    refuse_overwriting_inputs({"--out": tmp_path / "other.json"}, {"--model": "google/gemma-2b"})


def test_bench_keeps_its_output_off_its_inputs_and_tries_it_first(tmp_path):
    gguf = tmp_path / "m.gguf"
    write_tiny_gguf(gguf)
    (tmp_path / "folder").mkdir()
    before = tree(tmp_path)
    assert_error(run_tool("bench", "--model", gguf, "--out", gguf), "would overwrite the input --model")
    assert_error(run_tool("bench", "--model", gguf, "--out", tmp_path / "folder"), "names a folder")
    assert_error(run_tool("bench", "--model", gguf, "--out", mkfifo(tmp_path / "fifo")), "names a FIFO")
    (tmp_path / "fifo").unlink()
    assert tree(tmp_path) == before


# ---- 2. sampling settings at the edges -----------------------------------------------------------------------------


BAD_FLAGS = [
    ("--temperature", "inf"),
    ("--temperature", "nan"),
    ("--temperature", "-1"),
    ("--temperature", "1e39"),
    ("--top-k", "-1"),
    ("--top-k", "0"),
    ("--top-p", "0"),
    ("--top-p", "1.5"),
    ("--top-p", "nan"),
    ("--min-p", "-0.1"),
    ("--min-p", "2"),
    ("--min-p", "nan"),
    ("--repetition-penalty", "0"),
    ("--repetition-penalty", "-1"),
    ("--repetition-penalty", "inf"),
    ("--repetition-penalty", "nan"),
    ("--repetition-penalty", "1e-300"),
    ("--max-new-tokens", "0"),
    ("--max-new-tokens", "-5"),
    ("--seed", str(1 << 70)),
]


@pytest.mark.parametrize("flag,value", BAD_FLAGS)
def test_chat_refuses_sampling_values_at_the_edges_naming_the_flag(flag, value, capsys, tmp_path):
    # Before the load: the model named does not even exist.
    code = load_tool("chat").main(["--model", str(tmp_path / "none"), "--prompt", "Hi", flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith(f"error: {flag} must be") and len(err.strip().splitlines()) == 1, err


def test_chat_sampling_refusals_are_one_line_in_a_subprocess(tmp_path):
    for flag, value in (("--temperature", "inf"), ("--top-p", "nan"), ("--repetition-penalty", "0")):
        assert_error(run_tool("chat", "--model", tmp_path / "none", "--prompt", "Hi", flag, value), flag)


@pytest.mark.parametrize(
    "name,value",
    [
        ("temperature", math.inf),
        ("temperature", -0.5),
        ("temperature", "0.7"),
        ("top_k", 2.5),
        ("top_k", True),
        ("top_p", math.nan),
        ("min_p", 1.01),
        ("repetition_penalty", math.inf),
        ("repetition_penalty", 1e-40),
        ("max_new_tokens", -1),
        ("seed", 1.5),
    ],
)
def test_the_api_and_the_engine_share_the_checks(name, value, model_dir):
    with pytest.raises(GemmaError, match=f"^{name} must be"):
        check_settings(**{name: value})
    with pytest.raises(GemmaError, match=f"^{name} must be"):
        generate(None, None, [[2, 5]], **{name: value})  # refused before the model is touched
    from gemma.generation.engine import Engine

    with pytest.raises(GemmaError, match=f"^{name} must be"):
        Engine._prepare(None, [2, 5], **{name: value})  # the checks come before anything of the engine's


def test_a_tiny_temperature_is_greedy(model_dir, tok):
    import gemma

    model, tokenizer = gemma.load(model_dir)
    prompt = [tokenizer.encode("The quick brown fox")]
    greedy = generate(model, tokenizer, prompt, max_new_tokens=12, stop_ids=())
    for t in (1e-45, 1e-300, MIN_TEMPERATURE / 2):
        assert SamplingParams(temperature=t).greedy
        assert generate(model, tokenizer, prompt, max_new_tokens=12, temperature=t, seed=1, stop_ids=()) == greedy
    assert not SamplingParams(temperature=MIN_TEMPERATURE).greedy


def test_chat_at_a_tiny_temperature_answers_as_greedy(model_dir, capsys):
    replies = []
    for t in ("0", "1e-45"):
        argv = [
            "--model",
            str(model_dir),
            "--dtype",
            "fp32",
            "--max-new-tokens",
            "8",
            "--prompt",
            "Hello",
            "--temperature",
            t,
            "--seed",
            "3",
        ]
        assert load_tool("chat").main(argv) == 0
        replies.append(capsys.readouterr().out)
    assert replies[0] == replies[1]


def test_extreme_logits_and_settings_stay_finite():
    big = torch.finfo(torch.bfloat16).max  # the largest logit a bf16 model can produce
    logits = torch.tensor([[big, -big, 0.0, 3.0, float("-inf"), big * 0.5]])
    seen = torch.tensor([[True, True, True, False, True, True]])
    g = torch.Generator().manual_seed(0)
    for t in (MIN_TEMPERATURE, 1e-3, 1.0, 1e30, float(torch.finfo(torch.float32).max)):
        probs = logits_to_probs(logits, SamplingParams(temperature=t, top_p=0.9, min_p=1e-30))
        assert torch.isfinite(probs).all() and abs(float(probs.sum()) - 1) < 1e-5, (t, probs)
    for penalty in (float(torch.finfo(torch.float32).tiny), 1e-20, 1e20, float(torch.finfo(torch.float32).max)):
        penalized = apply_repetition_penalty(logits, seen, penalty)
        assert not torch.isnan(penalized).any() and not (penalized == float("inf")).any(), (penalty, penalized)
        params = SamplingParams(temperature=1.0, repetition_penalty=penalty)
        assert 0 <= int(sample(logits, params, g, seen)[0]) < 6
    # A T far below MIN_TEMPERATURE would divide the top logit into NaN; it is greedy instead.
    assert sample(logits, SamplingParams(temperature=1e-45), g).tolist() == [0]


# ---- 3. full disk and read-only outputs ------------------------------------------------------------------------


def test_a_full_disk_mid_conversion_keeps_dst_and_leaves_nothing(model_dir, tmp_path, monkeypatch, capsys):
    import gemma.formats.checkpoint as checkpoint

    dst = tmp_path / "out"
    assert load_tool("convert").main([str(model_dir), str(dst), "--to", "native"]) == 0
    before = tree(tmp_path)
    real = checkpoint.save_safetensors

    def full(tensors, path):  # half the file is written, then the disk is full
        real(tensors, path)
        with open(path, "r+b") as f:
            f.truncate(path.stat().st_size // 2)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(checkpoint, "save_safetensors", full)
    capsys.readouterr()
    for to in ("native", "hf"):
        assert load_tool("convert").main([str(model_dir), str(dst), "--to", to, "--force"]) == 2
        err = capsys.readouterr().err
        assert err == f"error: {dst}: no space left on device\n", err
        assert tree(tmp_path) == before  # DST as it was, no temporary folder


def test_a_failing_second_rename_puts_the_old_dst_back(tmp_path, monkeypatch):
    dst, tmp = tmp_path / "dst", tmp_path / ".dst.tmp-1"
    for folder, text in ((dst, "old"), (tmp, "new")):
        folder.mkdir()
        (folder / "f").write_text(text)
    monkeypatch.setattr(writing, "exchange", lambda a, b: False)  # as where renameat2 is missing
    real = os.replace

    def replace(a, b):
        if Path(a) == tmp:
            raise OSError(errno.EIO, "input/output error", str(b))
        real(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError):
        install(tmp, dst)
    assert (dst / "f").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == [".dst.tmp-1", "dst"]


def test_a_full_disk_writing_two_files_replaces_neither(tmp_path, monkeypatch):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.json"
    a.write_text("old a")
    b.write_text("old b")
    real = os.fsync
    calls = []

    def fsync(fd):
        calls.append(fd)
        if len(calls) == 2:  # the second file's data does not fit
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    with pytest.raises(GemmaError, match=r"b\.json: cannot write \(no space left on device\)"):
        write_files_atomically({a: "new a", b: "new b"})
    assert a.read_text() == "old a" and b.read_text() == "old b"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.json"]


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0, reason="root writes into 0o555 folders")
def test_read_only_output_folders(model_dir, data, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "out").mkdir()
    (ro / "out" / "f").write_text("kept")
    ro.chmod(0o555)
    try:
        before = tree(tmp_path)
        assert_error(
            run_tool("evaluate", "--model", tmp_path / "no-model", "--data", data, "--out", ro / "e.json"),
            "--out cannot be written",
            "permission denied",
        )
        assert_error(run_tool("convert", model_dir, ro / "out", "--to", "native", "--force"), alone=False)
        assert tree(tmp_path) == before
    finally:
        ro.chmod(0o755)


DRIVER = textwrap.dedent('''
    """Runs in a private mount namespace (unshare -rm): a real tiny tmpfs, filled up, then made read-only."""
    import hashlib, json, os, subprocess, sys
    from pathlib import Path

    tools, src, data, mnt, size = Path(sys.argv[1]), sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]

    def tool(name, *args):
        p = subprocess.run([sys.executable, str(tools / f"{name}.py"), *map(str, args)], capture_output=True,
                           text=True, timeout=180)
        return [p.returncode, p.stderr]

    def tree():
        return {str(p.relative_to(mnt)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(mnt.rglob("*"))}

    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    r = {"first": tool("convert", src, mnt / "out", "--to", "native")}
    before = tree()
    r["full"] = tool("convert", src, mnt / "out", "--to", "native", "--force") + [tree() == before]
    (mnt / "e.json").write_text("{}")
    (mnt / "e.predictions.jsonl").write_text("")
    fd = os.open(mnt / "filler", os.O_WRONLY | os.O_CREAT)  # the rest of the disk
    try:
        while True:
            os.write(fd, b"x" * 4096)
    except OSError:
        os.close(fd)
    before = tree()
    r["eval_full"] = tool("evaluate", "--model", src, "--data", data, "--out", mnt / "e.json", "--max-new-tokens",
                          "2", "--dtype", "fp32") + [tree() == before]
    (mnt / "filler").unlink()
    subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
    before = tree()
    r["ro_convert"] = tool("convert", src, mnt / "out", "--to", "hf", "--force") + [tree() == before]
    r["ro_eval"] = tool("evaluate", "--model", "no-such-model", "--data", data, "--out", mnt / "new.json")
    print(json.dumps(r))
''')


def test_a_real_full_and_read_only_file_system(model_dir, data, tmp_path):
    """A 1.6x-the-model tmpfs in a private mount namespace: the first conversion fits, a second copy does not."""
    if shutil.which("unshare") is None or subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode:
        pytest.skip("no private mount namespaces here (unshare -rm)")
    size = sum(p.stat().st_size for p in model_dir.iterdir())
    (tmp_path / "mnt").mkdir()
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [
            "unshare",
            "-rm",
            sys.executable,
            str(tmp_path / "driver.py"),
            str(TOOLS),
            str(model_dir),
            str(data),
            str(tmp_path / "mnt"),
            str(int(size * 1.6) // 4096 * 4096),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if proc.returncode and "mount" in proc.stderr and "permission" in proc.stderr.lower():
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["first"][0] == 0, r["first"]

    def one_line(result, *words):
        code, err, *same = result
        assert code == 2 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and all(w in errors[0] for w in words), err
        assert same in ([], [True]), "the earlier output changed"

    one_line(r["full"], "out: no space left on device")
    one_line(r["eval_full"], "e.predictions.jsonl: cannot write (no space left on device)")
    one_line(r["ro_convert"], "read-only file system")
    one_line(r["ro_eval"], "new.json: --out cannot be written there (read-only file system)")


# ---- 4. bytes that are not UTF-8 ---------------------------------------------------------------------------------


def test_chat_refuses_a_prompt_that_is_not_utf8(tmp_path):
    for flag in (b"--prompt", b"--system", b"--stop"):
        args = [b"--model", str(tmp_path / "none").encode(), b"--prompt", b"Hi", flag, b"caf\xe9 \xff"]
        assert_error(run_tool("chat", *args), flag.decode(), "not valid text")


def test_interactive_chat_reports_a_bad_line_and_carries_on(model_dir):
    run = run_tool(
        "chat",
        "--model",
        model_dir,
        "--dtype",
        "fp32",
        "--max-new-tokens",
        "3",
        "--stats",
        input=b"Hello\n\xff\xfe broken\nAgain\n/exit\n",
    )
    assert run.returncode == 0 and "Traceback" not in run.stderr, run.stderr
    errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "not valid text" in errors[0], run.stderr
    assert sum(line.startswith("[prefill") for line in run.stderr.splitlines()) == 2  # both good lines answered


def test_evaluate_names_the_line_of_a_lone_surrogate(tmp_path):
    data = tmp_path / "s.jsonl"
    data.write_text('{"instruction": "Hi", "output": "Hello"}\n{"instruction": "\\ud800", "output": "x"}\n')
    before = tree(tmp_path)
    assert_error(
        run_tool("evaluate", "--model", tmp_path / "none", "--data", data, "--out", tmp_path / "e.json"), f"{data}:2"
    )
    assert tree(tmp_path) == before


# ---- 5. leftovers of killed writers ---------------------------------------------------------------------------------


def test_leftovers_of_dead_writers_are_cleaned_and_a_parked_dst_comes_back(tmp_path):
    dead, alive = dead_pid(), os.getppid()
    dst = tmp_path / "model"
    for name, text in (
        (f".model.old-{dead}", "the old model"),
        (f".model.tmp-{dead}", "half"),
        (f".model.tmp-{alive}", "someone's write in progress"),
        (f".other.tmp-{dead}", "not ours"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "f").write_text(text)
    clean_leftovers(dst)
    assert (dst / "f").read_text() == "the old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.tmp-{alive}", f".other.tmp-{dead}", "model"]
    # With DST present, a dead writer's parked old copy is garbage.
    (tmp_path / f".model.old-{dead}").mkdir()
    clean_leftovers(dst)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".model.tmp-{alive}", f".other.tmp-{dead}", "model"]


def test_exchange_swaps_two_folders_in_one_step(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for folder in (a, b):
        folder.mkdir()
        (folder / "name").write_text(folder.name)
    if not exchange(a, b):
        pytest.skip("no renameat2(RENAME_EXCHANGE) on this system or file system")
    assert (a / "name").read_text() == "b" and (b / "name").read_text() == "a"


KILLED_WRITER = textwrap.dedent('''
    """Convert SRC to DST --force, stopping (to be killed) at STAGE: 'writing' (the weights half written) or
    'renaming' (the old DST renamed aside, the new one not yet in place: the two-rename fallback)."""
    import os, sys, time
    from pathlib import Path

    import gemma.formats.checkpoint as checkpoint
    import gemma.writing as writing
    from gemma.formats.convert import convert

    src, dst, stage, ready = sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4])

    def wait_for_the_kill():
        ready.write_text(str(os.getpid()))
        time.sleep(600)

    if stage == "writing":
        def half(tensors, path):
            path.write_bytes(b"half a safetensors file")
            wait_for_the_kill()
        checkpoint.save_safetensors = half
    else:
        writing.exchange = lambda a, b: False
        real = os.replace
        def replace(a, b):
            real(a, b)
            if ".old-" in str(b):
                wait_for_the_kill()
        os.replace = replace
    convert(src, dst, "native", force=True)
''')


@pytest.mark.parametrize("stage", ["writing", "renaming"])
def test_kill_9_mid_conversion_then_the_next_run(stage, model_dir, tmp_path):
    dst = tmp_path / "out"
    shutil.copytree(model_dir, dst)
    (dst / "mine.txt").write_text("the DST that was here")
    before = tree(dst)
    (tmp_path / "writer.py").write_text(KILLED_WRITER)
    ready = tmp_path / "ready"
    child = subprocess.Popen(
        [sys.executable, str(tmp_path / "writer.py"), str(model_dir), str(dst), stage, str(ready)],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.monotonic() + TIMEOUT
        while not ready.exists() and child.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ready.exists(), child.stderr.read().decode() if child.poll() is not None else "writer never got there"
        child.send_signal(signal.SIGKILL)
    finally:
        child.kill()
        child.wait()
        child.stderr.close()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out."))
    if stage == "writing":
        assert leftovers == [f".out.tmp-{child.pid}"] and tree(dst) == before
    else:
        assert leftovers == [f".out.old-{child.pid}", f".out.tmp-{child.pid}"] and not dst.exists()
    # The next run puts a parked DST back (so, without --force, it is refused as existing) and clears the rest.
    assert_error(run_tool("convert", model_dir, dst, "--to", "native"), "already exists")
    assert tree(dst) == before
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


# ---- 6. evaluate: outputs tried before the load, JSON without NaN ---------------------------------------------------


def test_evaluate_tries_its_outputs_before_loading(data, tmp_path):
    (tmp_path / "folder").mkdir()
    blocker = tmp_path / "file"
    blocker.write_text("")
    before = tree(tmp_path)
    no_model = tmp_path / "no-model"  # a load would fail on this; the outputs are refused first
    assert_error(
        run_tool("evaluate", "--model", no_model, "--data", data, "--out", tmp_path / "folder"), "--out names a folder"
    )
    assert_error(
        run_tool(
            "evaluate",
            "--model",
            no_model,
            "--data",
            data,
            "--out",
            tmp_path / "e.json",
            "--predictions",
            blocker / "p.jsonl",
        ),
        "--predictions cannot be written there",
    )
    assert tree(tmp_path) == before


def test_evaluate_writes_null_for_numbers_json_lacks(model_dir, data, tmp_path, monkeypatch, capsys):
    import train.metrics

    monkeypatch.setattr(train.metrics, "mean_loss", lambda losses: (math.nan, 3))
    monkeypatch.setattr(train.metrics, "perplexity", lambda loss: math.inf)
    out = tmp_path / "e.json"
    code = load_tool("evaluate").main(
        ["--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-new-tokens", "2", "--dtype", "fp32"]
    )
    assert code == 0, capsys.readouterr().err
    text = out.read_text()
    assert "NaN" not in text and "Infinity" not in text
    summary = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in eval.json"))
    assert summary["loss"] is None and summary["perplexity"] is None and summary["scored"] == 2


# ---- 7. FIFOs and devices given as files ----------------------------------------------------------------------------


def test_fifos_and_devices_given_as_files(tmp_path, data):
    fifo = mkfifo(tmp_path / "m.gguf")
    out = tmp_path / "out"
    assert_error(
        run_tool("evaluate", "--model", tmp_path / "none", "--data", fifo, "--out", out / "e.json"), "is a FIFO"
    )
    assert_error(
        run_tool("evaluate", "--model", tmp_path / "none", "--data", "/dev/zero", "--out", out / "e.json"),
        "/dev/zero: is a device",
    )
    assert_error(run_tool("evaluate", "--model", fifo, "--data", data, "--out", out / "e.json"), "is a FIFO")
    assert_error(run_tool("convert", fifo, out / "c", "--to", "native"), "is a FIFO")
    assert_error(run_tool("convert", "/dev/zero", out / "c", "--to", "native"), "is a device")
    assert_error(run_tool("chat", "--model", "/dev/zero", "--prompt", "Hi"), "is a device")
    assert_error(run_tool("bench", "--model", fifo, "--out", out / "b.json"), "is a FIFO")
    folder = tmp_path / "hf"
    folder.mkdir()
    mkfifo(folder / "config.json")
    assert_error(run_tool("bench", "--model", folder, "--out", out / "b.json"), "config.json: is a FIFO", alone=False)
    assert not (out / "c").exists() and not (out / "b.json").exists()


def test_chat_reading_dev_zero_ends_with_one_line(model_dir):
    with open("/dev/zero", "rb") as zero:
        run = run_tool("chat", "--model", model_dir, "--dtype", "fp32", "--max-new-tokens", "3", stdin=zero)
    assert_error(run, "standard input: a line longer than", alone=False)
