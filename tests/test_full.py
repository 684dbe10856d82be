"""train.sft --full: the run equals a plain PyTorch AdamW loop over the same batches, step for step; its model folder
loads in transformers with our logits; --train-modules freezes what it leaves out; bad combinations are one line."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import gemma
from train.data import collate, load_dataset, plan_epoch
from train.full import module_kind
from train.schedule import lr_at

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "examples" / "arith_train.jsonl"


def sft(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train.sft", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("checkpointing", [False, True], ids=["", "grad-checkpointing"])
def test_full_fine_tuning_is_a_plain_adamw_loop(tiny_folder, tmp_path, checkpointing):
    steps, batch, lr = 5, 4, 1e-3
    run = sft(
        *(["--grad-checkpointing"] if checkpointing else []),
        *("--model", tiny_folder, "--data", ARITH, "--full", "--precision", "fp32", "--save-format", "native"),
        *("--max-steps", steps, "--batch-size", batch, "--lr", lr, "--warmup-ratio", 0.2, "--weight-decay", 0.01),
        *("--out", tmp_path / "run"),
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "trainable" in run.stdout and "model in" in run.stdout

    # The reference: the same model and examples, the steps' batches as the plan picks them, the loss and its
    # gradient by autograd over the whole logits, the gradient clipped, AdamW with the schedule's rate.
    model, tokenizer = gemma.load(tiny_folder, dtype=torch.float32)
    model.train()
    examples, _ = load_dataset(ARITH, tokenizer, model.config.max_seq_len)
    plan = plan_epoch([len(e.input_ids) for e in examples], batch, seed=0, epoch=0)
    params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)
    losses = []
    for step in range(steps):
        b = collate([examples[i] for i in plan[step]], tokenizer.pad_id)
        logits = model(b["tokens"], b.get("positions"), b.get("segment_ids"))
        n = int((b["targets"] != -100).sum())
        loss = F.cross_entropy(logits.flatten(0, 1), b["targets"].flatten(), reduction="sum") / n
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, steps, lr, int(0.2 * steps))
        opt.step()
        losses.append(loss.item())

    logged = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert logged == pytest.approx(losses, rel=1e-6, abs=1e-6)
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    ours = dict(model.named_parameters())
    assert set(trained) == set(ours)
    for name, tensor in trained.items():
        torch.testing.assert_close(tensor, ours[name].detach(), atol=1e-6, rtol=1e-6)


def test_the_model_folder_loads_in_transformers_with_our_logits(tiny_folder, tmp_path):
    transformers = pytest.importorskip("transformers")
    flags = ["--full", "--precision", "fp32", "--max-steps", 2]
    run = sft("--model", tiny_folder, "--data", ARITH, *flags, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    folder = tmp_path / "run" / "model"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager").eval()
    ours, _ = gemma.load(folder, dtype=torch.float32)
    base, _ = gemma.load(tiny_folder, dtype=torch.float32)
    x = torch.randint(3, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = theirs(x).logits
        torch.testing.assert_close(ours(x), expected, atol=1e-5, rtol=1e-5)
        assert (base(x) - expected).abs().max() > 1e-3  # it trained


def test_train_modules_freeze_what_they_leave_out(tiny_folder, tmp_path):
    flags = ["--full", "--train-modules", "attention,norms", "--precision", "fp32", "--save-format", "native"]
    run = sft("--model", tiny_folder, "--data", ARITH, *flags, "--max-steps", 2, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    base, _ = gemma.load(tiny_folder, dtype=torch.float32)
    for name, p in base.named_parameters():
        moved = not torch.equal(trained[name], p.detach())
        assert moved == (module_kind(name) in ("attention", "norms")), name


def test_full_fine_tuning_trains_every_gemma4_branch(tiny_tokenizer_path, tmp_path):
    """Per-layer embeddings, KV sharing, the experts and the router all train (the experts' 3-D weights included)."""
    from conftest import hf_folder
    from test_gemma4 import hf_gemma4

    folder = hf_folder(hf_gemma4("all", vocab=1024), tmp_path / "model", tiny_tokenizer_path)
    flags = ["--full", "--precision", "fp32", "--save-format", "native", "--max-steps", 2, "--lr", 1e-2]
    run = sft("--model", folder, "--data", ARITH, *flags, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr[-3000:]
    trained = load_file(tmp_path / "run" / "model" / "model.safetensors")
    base, _ = gemma.load(folder, dtype=torch.float32)
    moved = {name for name, p in base.named_parameters() if not torch.equal(trained[name], p.detach())}
    for kind in ("moe.gate_up", "moe.down", "moe.router.weight", "per_layer.embed.weight", "attn.q.weight"):
        assert any(kind in name for name in moved), kind


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--full", "--base-quant", "nf4"], "error: --base-quant nf4 with --full: a quantized base is frozen"),
        (["--train-modules", "mlp"], "error: --train-modules applies to --full only"),
        (["--full", "--train-modules", "heads"], "error: --train-modules: unknown module kind 'heads'"),
        (["--full", "--dora"], "error: --dora is a LoRA variant; --full trains no adapter"),
    ],
)
def test_bad_combinations_are_one_line(tiny_folder, tmp_path, flags, message):
    run = sft("--model", tiny_folder, "--data", ARITH, "--max-steps", 1, *flags, "--out", tmp_path / "run")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith(message), run.stderr[-1000:]
    assert not (tmp_path / "run").exists()
