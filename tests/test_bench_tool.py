"""tools/bench_workloads.py and tools/bench.py: the decode, prefill and agreement workloads measure the same work
on both sides, and the command runs end to end (tiny random model, one repetition), printing the table and writing
the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench_workloads import agreement, decode, model_folder, ours, prefill_run, prompt_ids, reference, weight_bytes
from gemma.model.quantize import quantize_model
from tiny_models import save_hf_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return save_hf_model("gemma3", tmp_path_factory.mktemp("bench") / "hf")


@pytest.fixture()
def chat_folder(hf_folder, tiny_tokenizer_path, tmp_path, monkeypatch):
    """The tiny HF folder with the tokenizer beside it (what serving and the GGUF export need), its query scale
    head_dim as llama.cpp assumes (see tests/test_gguf_write.py); the bench's cache in tmp_path."""
    import shutil

    import bench_workloads

    folder = tmp_path / "hf"
    shutil.copytree(hf_folder, folder)
    shutil.copy(tiny_tokenizer_path, folder / "tokenizer.model")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "query_pre_attn_scalar": config["head_dim"]}))
    monkeypatch.setattr(bench_workloads, "CACHE", tmp_path / "cache")
    return folder


def test_model_folder_takes_hf_folders_as_they_are(hf_folder):
    assert model_folder(str(hf_folder)) == hf_folder


def test_weight_bytes_counts_the_tied_head_once(hf_folder):
    model = ours(hf_folder, torch.bfloat16, torch.device("cpu"))
    n = sum(p.numel() for p in model.parameters())  # the embedding is one parameter, used twice
    assert weight_bytes(model) == 2 * n
    ref = reference(hf_folder, torch.bfloat16, torch.device("cpu"))
    assert weight_bytes(ref) >= weight_bytes(model)  # + its rotary tables (buffers)
    quantize_model(model)
    assert weight_bytes(model) < 0.6 * 2 * n  # int8 + per-row scales + bf16 norms


@pytest.mark.parametrize("impl", ["ours", "reference"])
def test_decode_and_prefill_workloads(hf_folder, impl):
    cpu = torch.device("cpu")
    r = decode(impl, hf_folder, batch=2, new_tokens=5, runs=2, device=cpu)
    assert len(r["tokens_per_s"]) == 2 and all(x > 0 for x in r["tokens_per_s"])
    assert r["peak_memory"] > 0 and r["bandwidth"] > 1e8 and r["bound_tokens_per_s"] > 0
    p = prefill_run(impl, hf_folder, prompt_len=16, runs=2, device=cpu)
    assert len(p["tokens_per_s"]) == 2


def test_ours_and_reference_decode_the_same_tokens(hf_folder):
    """The two sides of the decode benchmark do the same work: the same greedy tokens from the same prompt."""
    from bench_workloads import _ours_generate

    cpu = torch.device("cpu")
    mine, theirs = ours(hf_folder, torch.float32, cpu), reference(hf_folder, torch.float32, cpu)
    ids = prompt_ids(2, 8, mine.config.vocab_size)
    seen = []
    from gemma.generation import steps

    real = steps.decode_steps

    def spy(*args, **kwargs):
        for step in real(*args, **kwargs):
            seen.append(step)
            yield step

    steps.decode_steps = spy
    try:
        with torch.no_grad():
            _ours_generate(mine, ids, 6)
    finally:
        steps.decode_steps = real
    ours_tokens = torch.tensor(seen).T  # (B, 6)
    with torch.no_grad():
        theirs_tokens = theirs.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=6,
            min_new_tokens=6,
            do_sample=False,
            pad_token_id=0,
        )[:, 8:]
    assert torch.equal(ours_tokens, theirs_tokens)


def test_agreement_of_a_model_with_itself_in_fp32(chat_folder):
    prompts = [[2, 5, 6, 7], [2, 9, 10]]
    r = agreement(chat_folder, prompts, new_tokens=4, dtype=torch.float32, device=torch.device("cpu"))
    assert r["tokens"] == 8 and r["teacher_forced_fp32"] == 1.0
    assert 0.0 <= r["teacher_forced"] <= 1.0 and 0.0 <= r["identical_prefix"] <= 1.0


def test_bench_cli_prints_the_table_and_writes_json(hf_folder, tmp_path):
    out = tmp_path / "b.json"
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tools" / "bench.py"),
            "--model",
            str(hf_folder),
            "--only",
            "decode1,prefill",
            "--quantize",
            "int4",
            "--compile",
            "--reps",
            "2",
            "--runs",
            "1",
            "--new-tokens",
            "4",
            "--prompt-len",
            "16",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr
    assert "greedy decode, batch 1" in proc.stdout and "int4 decode, batch 1" in proc.stdout
    report = json.loads(out.read_text())
    assert set(report["results"]) == {  # no tokenizer in the folder: no serving or llama.cpp rows
        "decode1",
        "prefill",
        "compiled-decode1",
        "int4-decode1",
        "int4-compiled-decode1",
        "compiled-prefill",
    }
    row = report["results"]["decode1"]
    assert row["ours"]["median"] > 0 and row["reference"]["median"] > 0 and row["ours"]["bound_tokens_per_s"] > 0
    # Speed from 2 processes where both took turns; the ratio is the median of the per-turn ratios.
    assert len(row["ours"]["processes"]) == 2 and all(len(p) == 2 for p in row["ours"]["processes"])  # 2 x --runs
    ratios = sorted(
        o / r for os_, rs in zip(row["ours"]["processes"], row["reference"]["processes"]) for o, r in zip(os_, rs)
    )
    assert abs(row["speed"] - (ratios[1] + ratios[2]) / 2) < 1e-9
    assert report["results"]["compiled-prefill"]["ours"]["first_s"] > 0 and "prefill, --compile" in proc.stdout
    assert "int4 decode, batch 1, --compile" in proc.stdout
    # one bandwidth for every bound: the best that any process of the run measured
    assert report["bandwidth"] == max(report["bandwidth_probes"]) and len(report["bandwidth_probes"]) >= 12
    assert row["ours"]["bound_tokens_per_s"] == report["bandwidth"] / row["ours"]["weight_bytes"]
    for flags, message in (
        (["--only", "decode3"], "unknown workload"),
        (["--quantize", "int3"], "unknown mode 'int3'"),
    ):
        bad = subprocess.run(
            [sys.executable, str(ROOT / "tools" / "bench.py"), *flags], capture_output=True, text=True, timeout=120
        )
        assert bad.returncode == 2 and message in bad.stderr
    # the README's table, rewritten from the JSON between its markers (the rest of the file kept as it was)
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:begin -->\nold table\n<!-- bench:end -->\nafter\n")
    cmd = [sys.executable, str(ROOT / "tools" / "bench.py"), "--from", str(out), "--readme", str(readme)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    body = readme.read_text()
    assert body.startswith("# x\n\nbefore\n<!-- bench:begin -->\n") and body.endswith("<!-- bench:end -->\nafter\n")
    assert "old table" not in body and "| int4 decode, batch 1 |" in body and report["date"][:10] in body
    (tmp_path / "other.json").write_text('{"a": 1}')
    cmd_other = [*cmd[:3], str(tmp_path / "other.json"), *cmd[4:]]
    refused = subprocess.run(cmd_other, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "not the JSON of a tools/bench.py run" in refused.stderr
    readme.write_text("no markers\n")
    refused = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and refused.stderr.startswith("error:") and "bench:begin" in refused.stderr
    assert readme.read_text() == "no markers\n"


def test_the_llama_cpp_side_decodes_our_q4_0_export(chat_folder):
    pytest.importorskip("llama_cpp")
    from bench_workloads import llama_cpp_decode, llama_cpp_gguf

    r = llama_cpp_decode(chat_folder, prompt_len=8, new_tokens=6, runs=2, vocab_size=1024)
    assert len(r["tokens_per_s"]) == 2 and all(x > 0 for x in r["tokens_per_s"]) and r["peak_memory"] > 0
    gguf = llama_cpp_gguf(chat_folder)
    assert r["weight_bytes"] == gguf.stat().st_size
    from gemma.formats.gguf_read import GGUFFile

    reader = GGUFFile(gguf)
    assert reader.fields["general.file_type"].contents() == 2  # MOSTLY_Q4_0: our writer's Q4_0
    assert {t.tensor_type.name for t in reader.tensors if len(t.shape) == 2} == {"Q4_0"}


def test_the_serving_workload_runs_8_requests_and_1(chat_folder):
    from bench_workloads import paired, serve_samplers

    samplers, first = serve_samplers(chat_folder, prompt_len=8, new_tokens=5, device=torch.device("cpu"))
    r = paired(samplers, 2)
    assert first > 0 and len(r["ours"]) == 2 and all(x > 0 for x in r["ours"] + r["reference"])
