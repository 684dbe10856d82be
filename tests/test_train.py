"""The training loop on tiny models: loss normalisation, packing, chunked loss, fp16, exact resume, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gemma
from gemma.formats.checkpoint import build_model, load_hf_folder
from lora import LoraConfig, inject
from train.data import collate, load_dataset, pack
from train.loop import accumulate, autocast_for
from train.loss import chunked_cross_entropy
from tiny_models import hf_model, tokens

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "examples" / "arith_train.jsonl"


@pytest.fixture
def lora_model(tiny_folder):
    model, tokenizer = gemma.load(tiny_folder)
    torch.manual_seed(0)
    inject(model, LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():  # B starts at zero; make the adapter matter
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model, tokenizer


def grads(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_accumulation_normalises_by_all_target_tokens(lora_model):
    model, tokenizer = lora_model
    examples, _ = load_dataset(ROOT / "examples" / "general_zh_en.jsonl", tokenizer, 96)
    four = examples[:4]
    assert len({sum(t != -100 for t in e.targets) for e in four}) > 1  # unequal target counts
    n = sum(sum(t != -100 for t in e.targets) for e in four)
    whole = [collate(four, tokenizer.pad_id)]
    split = [collate([e], tokenizer.pad_id) for e in four]
    loss_a = accumulate(model, whole, n, "fp32", "cpu")
    ga = grads(model)
    loss_b = accumulate(model, split, n, "fp32", "cpu")
    gb = grads(model)
    assert abs(loss_a - loss_b) <= 1e-6 * abs(loss_a)  # fp32 sums in another order
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], atol=1e-6, rtol=0)


def test_packed_batch_gives_each_record_its_own_loss(lora_model):
    model, tokenizer = lora_model
    examples, _ = load_dataset(ARITH, tokenizer, 64)
    records = examples[:6]
    packed = pack(records, 256)
    assert len(packed) < len(records)
    with torch.no_grad():
        batch = collate(packed, tokenizer.pad_id)
        h = model.hidden_states(batch["tokens"], batch["positions"], batch["segment_ids"])
        logits = model.logits(h)
        alone_total = 0.0
        for e in records:
            b = collate([e], tokenizer.pad_id)
            loss, _ = chunked_cross_entropy(model, model.hidden_states(b["tokens"]), b["targets"])
            alone_total += loss.item()
        packed_total = torch.nn.functional.cross_entropy(
            logits.flatten(0, 1), batch["targets"].flatten(), reduction="sum", ignore_index=-100
        ).item()
    assert abs(packed_total - alone_total) < 1e-5 * max(1.0, abs(alone_total))


def test_chunked_loss_equals_plain_loss_and_gradients(lora_model):
    model, tokenizer = lora_model
    examples, _ = load_dataset(ARITH, tokenizer, 64)
    batch = collate(examples[:5], tokenizer.pad_id)
    h = model.hidden_states(batch["tokens"])
    chunked, n = chunked_cross_entropy(model, h, batch["targets"], chunk=7)
    chunked.backward()
    g1 = grads(model)
    h = model.hidden_states(batch["tokens"])
    plain = torch.nn.functional.cross_entropy(
        model.logits(h).flatten(0, 1), batch["targets"].flatten(), reduction="sum", ignore_index=-100
    )
    plain.backward()
    g2 = grads(model)
    assert n == int((batch["targets"] != -100).sum())
    torch.testing.assert_close(chunked, plain, atol=1e-4, rtol=1e-6)
    for k in g1:
        # Within a few float32 ulps of each tensor's largest gradient: the chunks sum in another order, and how far
        # that moves one element depends on the CPU's kernels (5.7e-7 of the largest on an AMD EPYC).
        torch.testing.assert_close(g1[k], g2[k], atol=4e-6 * float(g2[k].abs().max()), rtol=1e-5)


@pytest.mark.parametrize("case", ("gemma2", "gemma3"))  # gemma2: the final softcap
@pytest.mark.parametrize("precision", ("fp32", "bf16"))
def test_chunked_loss_gradient_by_hand_is_as_accurate_as_autograd(case, precision, tmp_path):
    # The chunked loss computes the hidden states' gradient by hand in its forward pass and scales it in backward,
    # which rounds differently from autograd through model.logits and F.cross_entropy. The loss must be the same
    # and the gradient as close to the float64 gradient of the same (rounded) logits (bf16: under autocast).
    hf_model(case).save_pretrained(tmp_path)
    cfg, state = load_hf_folder(tmp_path, torch.bfloat16 if precision == "bf16" else torch.float32)
    model = build_model(cfg, state, "cpu").requires_grad_(False)  # a frozen head, as under LoRA
    x = tokens(3, 20)
    targets = torch.cat([x[:, 1:], torch.full((3, 1), -100)], dim=1)
    targets[0, :5] = -100
    h = model.hidden_states(x).detach()
    results = []
    for by_hand in (True, False):
        leaf = h.clone().requires_grad_()
        with autocast_for(precision, torch.device("cpu")):
            if by_hand:
                loss, _ = chunked_cross_entropy(model, leaf, targets, chunk=7)
            else:
                loss = torch.nn.functional.cross_entropy(
                    model.logits(leaf).flatten(0, 1), targets.flatten(), reduction="sum", ignore_index=-100
                )
        (loss / 37).backward()  # as accumulate divides by the target count
        results.append((loss.detach(), leaf.grad))
    with autocast_for(precision, torch.device("cpu")):
        z = torch.nn.functional.linear(h, model.embed.weight).double().requires_grad_()  # the rounded logits
    cap = cfg.final_softcap
    logits = torch.tanh(z / cap) * cap if cap is not None else z
    (torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum") / 37).backward()
    exact = z.grad @ model.embed.weight.double()
    (loss_a, grad_a), (loss_b, grad_b) = results
    torch.testing.assert_close(loss_a, loss_b, atol=0, rtol=1e-5)  # summed in another order
    error = lambda g: ((g.double() - exact).abs().max() / exact.abs().max()).item()  # noqa: E731
    # At most twice autograd's error, or at float32's noise floor (a few ulps of the largest gradient, where the
    # ratio means nothing: on an AMD EPYC the fp32 errors are 1.2e-6 by hand and 5.1e-7 by autograd).
    assert error(grad_a) <= max(2 * error(grad_b), 2e-6)


# ---- the command ---------------------------------------------------------------------------------------------------


def sft(*args, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train.sft", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=kw.get("cwd", ROOT),
        timeout=600,
    )


def test_sft_writes_adapter_metrics_and_config(tiny_folder, tmp_path):
    out = tmp_path / "run"
    run = sft(
        "--model",
        tiny_folder,
        "--data",
        ARITH,
        "--max-steps",
        4,
        "--batch-size",
        2,
        "--grad-accum",
        2,
        "--eval-split",
        0.05,
        "--eval-every",
        2,
        "--out",
        out,
        "--lora-r",
        4,
    )
    assert run.returncode == 0, run.stderr
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert all({"step", "loss", "lr", "tokens_per_s"} <= m.keys() for m in lines)
    assert "eval_loss" in lines[1] and "eval_loss" in lines[3]
    config = json.loads((out / "config.json").read_text())
    assert config["lora_r"] == 4 and config["resolved"]["total_steps"] == 4
    adapter_config = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str(Path(tiny_folder).resolve())  # peft finds its base
    model, _ = gemma.load(tiny_folder, adapter=out / "adapter")  # the adapter loads back
    assert sum(p.numel() for n, p in model.named_parameters() if "lora" in n) > 0
    import peft

    theirs = peft.AutoPeftModelForCausalLM.from_pretrained(out / "adapter")  # finds its base by itself
    assert sum(p.numel() for n, p in theirs.named_parameters() if "lora" in n) == sum(
        p.numel() for n, p in model.named_parameters() if "lora" in n
    )


def test_fp16_with_data_smaller_than_one_window(tiny_gemma2_folder, tmp_path):
    data = tmp_path / "three.jsonl"
    data.write_text("\n".join(ARITH.read_text().splitlines()[:3]) + "\n")
    run = sft(
        "--model",
        tiny_gemma2_folder,
        "--data",
        data,
        "--epochs",
        2,
        "--batch-size",
        2,
        "--grad-accum",
        4,
        "--precision",
        "fp16",
        "--out",
        tmp_path / "run",
    )
    assert run.returncode == 0, run.stderr
    assert "unscale_" not in run.stderr
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # one partial window per epoch, each stepped


def _interrupted_and_resumed(common: list, where: Path) -> list[str]:
    """Train `common` whole, then again interrupted by SIGINT after 3 steps and resumed; the adapter tensors that
    differ between the two (none when the resume is exact)."""
    whole = sft(*common, "--out", where / "whole")
    assert whole.returncode == 0, whole.stderr

    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = where / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "train.sft", *map(str, common), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
            proc.send_signal(signal.SIGINT)
            break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGINT, err
    assert "Traceback" not in err and "--resume" in err
    stopped_at = max(int(p.name.split("-")[1]) for p in (out / "checkpoints").iterdir())
    assert stopped_at < 40

    resumed = sft(*common, "--out", out, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    steps = [json.loads(x)["step"] for x in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))
    a, b = load_file(_written(where / "whole")), load_file(_written(out))
    assert a.keys() == b.keys()
    return [k for k in a if not torch.equal(a[k], b[k])]


def _written(run: Path) -> Path:
    """The tensors a run wrote: its adapter, or under --full its model."""
    model = run / "model" / "model.safetensors"
    return model if model.exists() else run / "adapter" / "adapter_model.safetensors"


@pytest.mark.parametrize(
    "precision, extra",
    [("fp32", []), ("bf16", []), ("bf16", ["--base-quant", "nf4"]), ("bf16", ["--full", "--save-format", "native"])],
    ids=["fp32", "bf16", "bf16-nf4", "bf16-full"],
)
def test_interrupted_and_resumed_run_is_bit_identical(tiny_folder, tmp_path, precision, extra):
    common = [
        *extra,
        "--model",
        tiny_folder,
        "--data",
        ARITH,
        "--max-steps",
        40,
        "--batch-size",
        2,
        "--grad-accum",
        2,
        "--lora-dropout",
        0.1,
        "--precision",
        precision,
        "--lora-r",
        4,
        "--save-every",
        15,
    ]
    # Bounded retries. In three CI runs, one fresh process - each time the uninterrupted one - computed the very
    # first step's loss differently from the others (bf16: 25.42504 against 25.42586 everywhere else, before any
    # update, so before anything was saved or resumed): this machine's matrix kernels are not always reproducible
    # from one process to the next. So the same interrupted+resumed run is compared with up to two more
    # uninterrupted runs, then the whole check runs once more. A resume that is not exact differs from every
    # uninterrupted run and still fails (checked by dropping the RNG restore).
    differ = _interrupted_and_resumed(common, tmp_path / "try1")
    for retry in range(2):
        if not differ:
            break
        whole = sft(*common, "--out", tmp_path / f"whole{retry}")
        assert whole.returncode == 0, whole.stderr
        a = load_file(_written(tmp_path / f"whole{retry}"))
        b = load_file(_written(tmp_path / "try1" / "cut"))
        differ = [k for k in a if not torch.equal(a[k], b[k])]
    if differ:
        differ = _interrupted_and_resumed(common, tmp_path / "try2")
    assert not differ, differ[:3]


@pytest.mark.parametrize(
    "content, message",
    [
        ('{"instruction": "a", "output": "b"}\n{"instruction": \n', "bad.jsonl:2"),
        ('{"query": "a", "reply": "b"}\n', "bad.jsonl:1"),
        ("", "bad.jsonl"),
    ],
)
def test_bad_data_is_a_one_line_error(tiny_folder, tmp_path, content, message):
    data = tmp_path / "bad.jsonl"
    data.write_text(content)
    run = sft("--model", tiny_folder, "--data", data, "--max-steps", 1, "--out", tmp_path / "run")
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and message in run.stderr and run.stderr.count("\n") == 1


def test_missing_data_and_unwritable_out(tiny_folder, tmp_path):
    run = sft("--model", tiny_folder, "--data", tmp_path / "nope.jsonl", "--max-steps", 1, "--out", tmp_path / "r")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "nope.jsonl" in run.stderr
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = sft("--model", tiny_folder, "--data", ARITH, "--max-steps", 1, "--out", blocker / "run")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1


def test_bad_flag_values(tiny_folder, tmp_path):
    run = sft("--model", tiny_folder, "--lora-targets", "q,zz", "--out", tmp_path / "r")
    assert run.returncode == 2 and "zz" in run.stderr
    cfg = tmp_path / "c.yaml"
    cfg.write_text("lr: 0.001\nbogus: 3\n")
    run = sft("--config", cfg, "--out", tmp_path / "r")
    assert run.returncode == 2 and "bogus" in run.stderr


def test_config_file_with_flag_override(tiny_folder, tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"model: {tiny_folder}\ndata: {ARITH}\nmax_steps: 3\nlora_r: 2\nlr: 1e-3\n")
    run = sft("--config", cfg, "--max-steps", 2, "--out", tmp_path / "r")
    assert run.returncode == 0, run.stderr
    resolved = json.loads((tmp_path / "r" / "config.json").read_text())
    assert resolved["max_steps"] == 2 and resolved["lora_r"] == 2 and resolved["lr"] == 1e-3


@pytest.mark.parametrize("layout", ["hf", "native"])
def test_fp16_is_refused_for_gemma3_before_the_weights_are_read(tiny_folder, tmp_path, layout):
    """Gemma 3's activations overflow fp16: one line that says why and what to use, and no run folder; the weights
    are never read (a corrupt weights file does not change the message)."""
    folder = tmp_path / "model"
    if layout == "hf":
        folder.mkdir()
        for name in ("config.json", "tokenizer.model"):
            (folder / name).write_bytes((tiny_folder / name).read_bytes())
    else:
        model, tokenizer = gemma.load(tiny_folder)
        from gemma.formats.checkpoint import save_native

        save_native(folder, model.config, model.state_dict(), tokenizer.model_proto)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    run = sft("--model", folder, "--data", ARITH, "--max-steps", 1, "--precision", "fp16", "--out", tmp_path / "run")
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert "Traceback" not in run.stderr
    assert lines[-1].startswith("error: --precision fp16: this model's activations (Gemma 3 and later) exceed")
    assert "use --precision bf16" in lines[-1]
    assert not (tmp_path / "run").exists()


def test_adapters_name_their_base_as_peft_finds_it(tmp_path):
    """A preset by its hub repo id (not "3-270m"), a local folder by its absolute path, a repo id as given."""
    from train.options import TrainOptions

    assert TrainOptions(size="3-270m").base_name == "google/gemma-3-270m"
    assert TrainOptions().base_name == "google/gemma-3-270m"  # the default model
    assert TrainOptions(size="4-e2b").base_name == "google/gemma-4-E2B"
    assert TrainOptions(model="google/gemma-2-2b-it").base_name == "google/gemma-2-2b-it"
    assert TrainOptions(model=str(tmp_path)).base_name == str(tmp_path.resolve())


def test_fp16_overflows_follows_the_generation():
    from gemma.model.config import preset

    assert [preset(n).fp16_overflows for n in ("2b", "2-2b", "3-270m", "3-27b")] == [False, False, True, True]
