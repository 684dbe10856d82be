"""The stages of train.loop on their own: the policies for steps whose update cannot be applied, the cadence of
what follows a step, signals, the data plan; then the stages run in this process on a tiny model."""

from __future__ import annotations

import json
import math
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from gemma.errors import GemmaError
from train import prepare
from train.distributed import AgreedError, Dist
from train.loop import Interrupted, Signals, build_setup, run_steps
from train.mixture import split_rows
from train.options import TrainOptions
from train.step import (
    FP16_SKIP_LIMIT,
    NONFINITE_LIMIT,
    BadSteps,
    RunState,
    Window,
    apply_update,
    cadence,
    metrics_record,
    update,
)

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "examples" / "arith_train.jsonl"
CPU = torch.device("cpu")


# ---- bad steps: non-finite losses and fp16 overflows -----------------------------------------------------------------


@pytest.mark.parametrize(
    "precision, loss, skipped",
    [
        ("fp32", float("nan"), True),
        ("bf16", float("inf"), True),
        ("fp32", 1.5, False),
        ("fp16", float("nan"), False),  # the scaler decides
    ],
)
def test_which_losses_skip_the_update(precision, loss, skipped):
    assert BadSteps(precision).skips(loss) is skipped


def test_non_finite_losses_in_a_row_stop_the_run_naming_the_last_checkpoint():
    bad = BadSteps("fp32")
    for _ in range(NONFINITE_LIMIT - 1):
        bad.nonfinite(3)
    with pytest.raises(AgreedError) as info:
        bad.nonfinite(4, lambda: Path("run/checkpoints/step-0000002"))
    assert str(info.value) == (
        "non-finite loss at 2 steps in a row (step 4); stopped. Last good checkpoint: run/checkpoints/step-0000002"
    )
    bad = BadSteps("bf16", streak=NONFINITE_LIMIT - 1)
    with pytest.raises(AgreedError, match=r"Last good checkpoint: none$"):
        bad.nonfinite(2)


def test_an_applied_update_ends_the_streak():
    bad = BadSteps("fp32")
    for _ in range(5):
        bad.nonfinite(1)
        bad.applied()
    assert bad.streak == 0


def test_fp16_overflows_in_a_row_stop_the_run():
    bad = BadSteps("fp16")
    for _ in range(FP16_SKIP_LIMIT - 1):
        bad.overflow()
    bad.applied()
    for _ in range(FP16_SKIP_LIMIT - 1):
        bad.overflow()
    with pytest.raises(AgreedError) as info:
        bad.overflow()
    assert str(info.value) == f"fp16 overflow at {FP16_SKIP_LIMIT} steps in a row; use --precision bf16"


def _linear(grad: float):
    """A 2x2 linear layer whose weight has gradient `grad` everywhere, its AdamW, and a clip over its weights."""
    torch.manual_seed(0)
    layer = torch.nn.Linear(2, 2, bias=False)
    layer.weight.grad = torch.full_like(layer.weight, grad)
    optimizer = torch.optim.AdamW(layer.parameters(), lr=0.1)
    return layer, optimizer, lambda m: float(torch.nn.utils.clip_grad_norm_(layer.parameters(), m))


def test_a_non_finite_loss_clears_the_gradient_and_leaves_the_weights():
    layer, optimizer, clip = _linear(1.0)
    before = layer.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    bad = BadSteps("fp32")
    grad_norm, skipped = update(bad, optimizer, scaler, clip, float("nan"), 1.0, step=1)
    assert math.isnan(grad_norm) and skipped and bad.streak == 1
    assert layer.weight.grad is None and torch.equal(layer.weight, before)


def test_a_finite_loss_clips_and_steps():
    layer, optimizer, clip = _linear(3.0)
    before = layer.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    bad = BadSteps("fp32", streak=1)
    grad_norm, skipped = update(bad, optimizer, scaler, clip, 0.5, 1.0, step=2)
    assert grad_norm == pytest.approx(6.0) and not skipped and bad.streak == 0  # norm of four 3s, before clipping
    assert layer.weight.grad is None and not torch.equal(layer.weight, before)


def test_no_clipping_limit_is_an_infinite_one():
    layer, optimizer, _ = _linear(3.0)
    limits = []
    apply_update(optimizer, torch.amp.GradScaler("cpu", enabled=False), lambda m: limits.append(m) or 0.0, 0.0)
    assert limits == [math.inf]


def test_an_fp16_overflow_is_skipped_by_the_scaler_and_counted():
    layer, optimizer, clip = _linear(math.inf)
    before = layer.weight.detach().clone()
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True)
    scaler.scale(torch.ones(()))  # as accumulate's backward does: the scale exists from then on
    bad = BadSteps("fp16")
    grad_norm, skipped = update(bad, optimizer, scaler, clip, float("inf"), 1.0, step=1)
    assert skipped and bad.streak == 1 and scaler.get_scale() < 1024.0
    assert torch.equal(layer.weight, before)
    layer.weight.grad = torch.ones_like(layer.weight) * scaler.get_scale()  # a scaled, finite gradient
    grad_norm, skipped = update(bad, optimizer, scaler, clip, 0.5, 1.0, step=2)
    assert not skipped and bad.streak == 0 and grad_norm == pytest.approx(2.0)


# ---- the cadence of what follows a step -----------------------------------------------------------------------------


def _cadences(total=5, **kw):
    flags = {"log_every": 1, "eval_every": 0, "save_every": 0, "has_eval": True, **kw}
    return [cadence(step, total, **flags) for step in range(1, total + 1)]


def test_log_every_n_steps_and_at_the_last():
    assert [c.log for c in _cadences(log_every=2)] == [False, True, False, True, True]
    assert [c.log for c in _cadences(log_every=1)] == [True] * 5
    assert [c.last for c in _cadences()] == [False, False, False, False, True]


def test_eval_every_n_steps_or_only_at_the_last_and_never_without_eval_data():
    assert [c.eval for c in _cadences(eval_every=2)] == [False, True, False, True, True]
    assert [c.eval for c in _cadences(eval_every=0)] == [False, False, False, False, True]
    assert [c.eval for c in _cadences(eval_every=1, has_eval=False)] == [False] * 5


def test_save_every_n_steps_but_not_at_the_last():
    # The last step's checkpoint is saved after the loop, once.
    assert [c.save for c in _cadences(total=6, save_every=3)] == [False, False, True, False, False, False]
    assert [c.save for c in _cadences(save_every=2)] == [False, True, False, True, False]
    assert [c.save for c in _cadences(save_every=0)] == [False] * 5


# ---- metrics, the tokens/s window, signals ---------------------------------------------------------------------------


def test_metrics_record_fields_in_order():
    state = RunState(step=6, epoch=1, batch_in_epoch=2, skipped=1)
    record = metrics_record(state, 0.5, 1e-4, 2.0, 100.0, steps_in_epoch=4, device=CPU)
    assert list(record) == ["step", "epoch", "loss", "lr", "grad_norm", "tokens_per_s", "skipped_steps"]
    assert record["step"] == 6 and record["epoch"] == 1.5 and record["skipped_steps"] == 1


def test_window_counts_tokens_until_reset():
    window = Window()
    window.add(30)
    window.add(12.0)
    assert window.tokens == 42 and window.rate() > 0
    window.reset()
    assert window.tokens == 0 and window.rate() == 0


def test_signals_are_noted_and_a_second_ctrl_c_of_one_process_stops_at_once():
    alone = Signals(Dist(device=CPU))
    alone(signal.SIGTERM, None)
    assert alone.pending == [signal.SIGTERM]
    with pytest.raises(KeyboardInterrupt):
        alone(signal.SIGINT, None)
    under_torchrun = Signals(Dist(device=CPU, world=2, mode="ddp"))
    under_torchrun(signal.SIGINT, None)
    under_torchrun(signal.SIGINT, None)  # torchrun has its own shutdown timeout
    assert under_torchrun.pending == [signal.SIGINT, signal.SIGINT]


def test_signal_handlers_are_installed_for_the_loop_and_restored():
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with Signals(Dist(device=CPU)) as signals:
        assert signal.getsignal(signal.SIGINT) is signals and signal.getsignal(signal.SIGTERM) is signals
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before


# ---- the data plan and the run folder -------------------------------------------------------------------------------


def test_eval_split_is_seeded_and_takes_at_least_one():
    rows = np.arange(100, 120)
    held = split_rows(len(rows), 0.25, 3, rows)
    assert len(held) == 5 and len(np.unique(held)) == 5 and np.isin(held, rows).all()
    assert (split_rows(len(rows), 0.25, 3, rows) == held).all()
    assert not (split_rows(len(rows), 0.25, 4, rows) == held).all()
    assert len(split_rows(len(rows), 0.01, 3, rows)) == 1  # at least one


def test_plan_sizes():
    opts = TrainOptions(batch_size=2, grad_accum=3, epochs=1.5, warmup_ratio=0.1)
    assert prepare.plan_sizes(25, opts, world=2) == (12, 5, 0)  # ceil(25 / 12) = 3 steps an epoch
    opts = TrainOptions(batch_size=2, max_steps=40, warmup_ratio=0.1)
    assert prepare.plan_sizes(25, opts, world=1) == (2, 40, 4)


def test_run_dir_checks(tmp_path):
    assert prepare.check_run_dir(tmp_path / "new", resume=False) is None
    with pytest.raises(GemmaError, match="no checkpoint to resume from"):
        prepare.check_run_dir(tmp_path / "new", resume=True)
    (tmp_path / "done" / "adapter").mkdir(parents=True)
    with pytest.raises(GemmaError, match="already holds a run"):
        prepare.check_run_dir(tmp_path / "done", resume=False)


# ---- the stages in this process, on a tiny model ---------------------------------------------------------------------


def _stages(tiny_folder, out: Path, **flags):
    opts = TrainOptions(
        model=str(tiny_folder),
        data=str(ARITH),
        batch_size=2,
        lora_r=4,
        precision="fp32",
        out=str(out),
        device="cpu",
        **flags,
    )
    run = prepare.start_run(opts, Dist(device=CPU), log=lambda m: None)
    setup = build_setup(run)
    data = prepare.load_data(run, setup.tokenizer, setup.max_len)
    return run, setup, data


def test_the_stages_train_and_write_what_a_run_writes(tiny_folder, tmp_path):
    run, setup, data = _stages(tiny_folder, tmp_path / "run", max_steps=3, eval_split=0.05, eval_every=2)
    assert data.total_steps == 3 and len(data.eval) == max(1, int(0.05 * (len(data.train) + len(data.eval))))
    state = RunState()
    with Signals(run.d) as signals:
        run_steps(run, setup, data, state, signals)
    assert state.step == 3 and state.best_eval < math.inf and [h[0] for h in state.history] == [1, 2, 3]
    lines = [json.loads(x) for x in run.metrics_path.read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and "eval_loss" in lines[1] and "eval_loss" in lines[2]
    assert (run.run_dir / "adapter" / "adapter_config.json").exists()
    assert (run.run_dir / "best_adapter" / "adapter_config.json").exists()
    assert [p.name for p in (run.run_dir / "checkpoints").iterdir()] == ["step-0000003"]


def test_a_signal_saves_after_the_step_and_raises_interrupted(tiny_folder, tmp_path):
    run, setup, data = _stages(tiny_folder, tmp_path / "run", max_steps=5)
    state = RunState()
    with Signals(run.d) as signals:
        signals.pending.append(signal.SIGTERM)  # as if it arrived during the first step
        with pytest.raises(Interrupted) as info:
            run_steps(run, setup, data, state, signals)
    assert info.value.signum == signal.SIGTERM and state.step == 1
    assert [p.name for p in (run.run_dir / "checkpoints").iterdir()] == ["step-0000001"]
    assert not (run.run_dir / "adapter").exists()
