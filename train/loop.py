"""The training loop: set up, then for each optimizer step accumulate, clip, step, log, maybe eval, maybe save.

`_train` reads as the run's stages, top to bottom: the folder and seeds, the model, the data, a checkpoint to
resume, config.json (train.prepare); the score before training; the steps (`optimizer_step`, then `after_step`,
with the update's policies and the cadence from train.step); the report. This module keeps the loss path
(`accumulate`, `eval_loss`) and the steps themselves.

The same loop runs in one process or, under torchrun, in every process of a data-parallel job (train.distributed):
each reads its share of every global batch, and the loop adds the few collectives that keep them in step.
"""

from __future__ import annotations

import itertools
import math
import signal
import sys
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from gemma.errors import GemmaError
from train import checkpoint as ckpt
from train import distributed, outputs, prepare
from train.data import Example, collate, plan_epoch, record_messages, shard
from train.loss import IGNORE, chunked_cross_entropy
from train.metrics import mean_loss, reference_losses
from train.options import TrainOptions
from train.report import exact_match, generate_replies, plot_losses
from train.schedule import lr_at
from train.step import BadSteps, RunState, Window, cadence, metrics_record, update


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the loop saved a checkpoint and stops."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def to_device(batch: dict[str, torch.Tensor], device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def batch_loss(model, batch, precision, device) -> tuple[torch.Tensor, int]:
    with autocast_for(precision, device):
        h = model.hidden_states(batch["tokens"], batch.get("positions"), batch.get("segment_ids"))
        return chunked_cross_entropy(model, h, batch["targets"])


class LossModule(nn.Module):
    """forward(batch) -> the summed token loss of a micro-batch: what DDP and FSDP wrap (train.distributed)."""

    def __init__(self, model, precision: str):
        super().__init__()
        self.model, self.precision = model, precision

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return batch_loss(self.model, batch, self.precision, batch["tokens"].device)[0]


def accumulate(
    model,
    batches: list[dict],
    n_targets: int,
    precision: str,
    device,
    scaler=None,
    replicas: distributed.Replicas | None = None,
) -> float:
    """Backward over the micro-batches of one optimizer step; returns the mean loss per target token.

    Each micro-batch's summed loss is divided by `n_targets`, the target tokens of the whole accumulated batch,
    so the gradient is that of the mean over all its tokens, however they are split into micro-batches.

    Under torchrun `replicas` runs them, `n_targets` counts the global batch (every process's share), and the
    returned value is this process's part of the global mean. DDP and FSDP average gradients over the processes,
    so the losses are multiplied back by their number (exactly, for a power of two); gradients are synchronised
    only in the last micro-batch's backward pass.
    """
    world = replicas.d.world if replicas is not None else 1
    loss_sum = torch.zeros((), device=device)
    for i, b in enumerate(batches):
        with replicas.sync(i == len(batches) - 1) if replicas is not None else nullcontext():
            loss = replicas(b) if replicas is not None else batch_loss(model, b, precision, device)[0]
            scaled = (loss * world if world > 1 else loss) / max(n_targets, 1)
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        loss_sum += loss.detach()
    return (loss_sum / max(n_targets, 1)).item()


# A one-token sequence with nothing to predict: the micro-batch of a process that has run out of data while the
# others have not. Its loss is 0 with a zero gradient, but its passes take part in the collectives.
_EMPTY = Example([0], [IGNORE])


@torch.no_grad()
def eval_loss(
    model,
    examples: list[Example],
    pad_id: int,
    batch_size: int,
    precision,
    device,
    replicas: distributed.Replicas | None = None,
) -> float:
    """Mean loss per target token over `examples`: in one process, train.metrics.reference_losses (what
    tools/evaluate.py reports as the reference loss) under the run's precision.

    Under torchrun the batches are dealt out to the processes and the sums added up; each process runs the same
    number of forward passes (an empty one when it has run out), since under FSDP each is a collective.
    """
    if replicas is None or not replicas.d.enabled:
        with autocast_for(precision, device):
            loss, _ = mean_loss(reference_losses(model, examples, pad_id, batch_size))
        return 0.0 if loss is None else loss
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    groups = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    d = replicas.d
    mine = groups[d.rank :: d.world]
    for k in range(math.ceil(len(groups) / d.world)):
        batch = to_device(collate([examples[j] for j in mine[k]] if k < len(mine) else [_EMPTY], pad_id), device)
        loss = replicas.evaluate(batch)
        if k < len(mine):
            total, count = total + loss.item(), count + int((batch["targets"] != IGNORE).sum())
    total, count = d.all_sum(total, count)
    model.train(was_training)
    return total / max(count, 1)


def trainable_state(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


# ---- the run, stage by stage -----------------------------------------------------------------------------------------


def train(opts: TrainOptions, log=print) -> Path:
    """Run one fine-tuning job; returns the run folder. Raises Interrupted after saving on SIGINT/SIGTERM.

    Under torchrun every process calls this: they train one model data-parallel, and only rank 0 logs and writes
    files other than its own part of a checkpoint.
    """
    d = distributed.start(opts)
    try:
        run_dir = _train(opts, d, log if d.main else _quiet)
    except (GemmaError, Interrupted):
        d.close()  # every process stopped at the same point (errors and signals are agreed on): a clean teardown
        raise
    # Any other error leaves the process group to the process's exit: a peer may still wait in a collective.
    d.close()
    return run_dir


def _quiet(message: str) -> None:
    """The log of a process other than rank 0."""


def _train(opts: TrainOptions, d: distributed.Dist, log) -> Path:
    run = prepare.start_run(opts, d, log)  # the folder (and what to resume), the seeds
    setup = build_setup(run)  # the model with its adapter, wrapped for this process; the optimizer
    data = prepare.load_data(run, setup.tokenizer, setup.max_len)
    state = RunState()
    if run.resume_from is not None:
        prepare.resume(run, setup, state)
    prepare.write_config(run, setup, data)
    report = score_before(run, setup)
    with Signals(d) as signals:
        run_steps(run, setup, data, state, signals)
    return finish(run, setup, state, report)


def build_setup(run: prepare.Run) -> prepare.Setup:
    """The model (frozen base in the compute dtype, adapter in float32), the loss wrapped for this process (as is,
    DDP or FSDP), AdamW over the adapter (FSDP: over its shards) and the fp16 gradient scaler."""
    opts, d = run.opts, run.d
    model, tokenizer, max_len = prepare.load_model(run)
    replicas = distributed.Replicas(LossModule(model, opts.precision), distributed.fsdp_units(model), d, opts.precision)
    optimizer = torch.optim.AdamW(
        replicas.params, lr=opts.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=opts.weight_decay
    )
    if opts.full:  # the model folder a run writes where a LoRA run writes its adapter
        replicas.full_output = (tokenizer, opts.save_format, torch.bfloat16 if opts.precision == "bf16" else None)
    scaler = torch.amp.GradScaler(d.device.type, enabled=opts.precision == "fp16")
    empty = to_device(collate([_EMPTY], tokenizer.pad_id), d.device)
    return prepare.Setup(model, tokenizer, max_len, replicas, optimizer, scaler, empty)


# ---- the steps -------------------------------------------------------------------------------------------------------


class Signals:
    """SIGINT and SIGTERM while training: noted, so that the loop finishes the current step, saves and stops (under
    torchrun: all processes, at the same step). A second Ctrl-C of one process stops it at once."""

    def __init__(self, d: distributed.Dist):
        self.d = d
        self.pending: list[int] = []  # the signals received, in order
        self._previous: dict = {}

    def __call__(self, signum, frame) -> None:
        if self.pending and not self.d.enabled:  # torchrun has its own --shutdown-timeout
            raise KeyboardInterrupt
        self.pending.append(signum)

    def __enter__(self) -> Signals:
        self._previous = {s: signal.signal(s, self) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


@dataclass
class Step:
    """What one optimizer step did (its loss and tokens global under torchrun)."""

    loss: float  # mean loss per target token of the global batch
    lr: float
    grad_norm: float  # before clipping; NaN when the update was skipped for a non-finite loss
    tokens: float  # tokens of the global batch, padding aside
    signalled: bool  # under torchrun: whether any process got SIGINT or SIGTERM before this step's end


def run_steps(run: prepare.Run, setup: prepare.Setup, data: prepare.Data, state: RunState, signals: Signals) -> None:
    """Optimizer steps from `state` to the last, then the final checkpoint and the adapter. After a signal: a
    checkpoint, then Interrupted."""
    from tqdm import tqdm

    bar = tqdm(
        total=data.total_steps,
        initial=state.step,
        desc="train",
        unit="step",
        dynamic_ncols=True,
        disable=not run.d.main,
    )
    try:
        plan = plan_epoch(data.lengths, data.global_batch, run.opts.seed, state.epoch)
        bad, window = BadSteps(run.opts.precision), Window()
        while state.step < data.total_steps:
            if state.batch_in_epoch >= len(plan):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                plan = plan_epoch(data.lengths, data.global_batch, run.opts.seed, state.epoch)
            done = optimizer_step(run, setup, data, state, plan[state.batch_in_epoch], signals, bad)
            window.add(done.tokens)
            after_step(run, setup, data, state, done, window, len(plan), bar, signals)
        bar.close()
        save(run, setup, state)
        write_adapter(run, setup, run.run_dir / output_name(run.opts))
    finally:
        bar.close()  # an error line must start a line of its own, not follow the bar


def micro_batches(
    run: prepare.Run, setup: prepare.Setup, data: prepare.Data, chosen: list[int]
) -> tuple[list[dict], int, int]:
    """(this process's micro-batches of the global batch `chosen` on the device, the target tokens of the whole
    global batch, this process's tokens)."""
    d, opts, pad = run.d, run.opts, setup.tokenizer.pad_id
    micro = shard(chosen, d.rank, d.world, opts.grad_accum)
    batches = [to_device(collate([data.train[i] for i in mb], pad), d.device) for mb in micro]
    # Normalise by the target tokens of the whole accumulated batch, not per micro-batch.
    n_targets = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
    tokens = sum(int((b["tokens"] != pad).sum()) for b in batches)
    if d.enabled:  # ... of all processes; and each runs as many micro-batches as the busiest
        n_targets = int(d.all_sum(n_targets)[0])
        busiest = max(len(shard(chosen, r, d.world, opts.grad_accum)) for r in range(d.world))
        batches += [setup.empty] * (busiest - len(batches))
    return batches, n_targets, tokens


def optimizer_step(
    run: prepare.Run,
    setup: prepare.Setup,
    data: prepare.Data,
    state: RunState,
    chosen: list[int],
    signals: Signals,
    bad: BadSteps,
) -> Step:
    """One optimizer step over the global batch `chosen`: set the learning rate, accumulate, update (or skip, by
    the policies of `bad`); advances `state`."""
    opts, d = run.opts, run.d
    batches, n_targets, tokens = micro_batches(run, setup, data, chosen)
    lr = lr_at(state.step, data.total_steps, opts.lr, data.warmup, opts.min_lr_ratio)
    for group in setup.optimizer.param_groups:
        group["lr"] = lr
    loss = accumulate(setup.model, batches, n_targets, opts.precision, d.device, setup.scaler, setup.replicas)
    signalled = False
    if d.enabled:  # the global loss and tokens, and whether any process got a signal
        loss, tokens, n_signals = d.all_sum(loss, tokens, len(signals.pending))
        signalled = n_signals > 0
    grad_norm, skipped = update(
        bad,
        setup.optimizer,
        setup.scaler,
        setup.replicas.clip_grad_norm,
        loss,
        opts.max_grad_norm,
        state.step + 1,
        lambda: _last_checkpoint(run.run_dir),
    )
    state.skipped += skipped
    state.step += 1
    state.batch_in_epoch += 1
    return Step(loss, lr, grad_norm, tokens, signalled)


def _last_checkpoint(run_dir: Path) -> Path | None:
    found = ckpt.checkpoint_dirs(run_dir)
    return found[-1] if found else None


def after_step(
    run: prepare.Run,
    setup: prepare.Setup,
    data: prepare.Data,
    state: RunState,
    done: Step,
    window: Window,
    steps_in_epoch: int,
    bar,
    signals: Signals,
) -> None:
    """Log, maybe eval (keeping the best adapter), maybe save, and stop after a signal (Interrupted)."""
    opts, d = run.opts, run.d
    when = cadence(
        state.step,
        data.total_steps,
        log_every=opts.log_every,
        eval_every=opts.eval_every,
        save_every=opts.save_every,
        has_eval=bool(data.eval),
    )
    record = None
    if when.log:
        record = metrics_record(state, done.loss, done.lr, done.grad_norm, window.rate(), steps_in_epoch, d.device)
        window.reset()
    eval_value = None
    if when.eval:
        eval_value = evaluate(run, setup, data, state)
        record = {**(record or {"step": state.step, "loss": done.loss, "lr": done.lr}), "eval_loss": eval_value}
    if record is not None:
        state.history.append((state.step, done.loss, eval_value))
        if d.main:
            outputs.append_metrics(run.metrics_path, record)
        bar.set_postfix(
            loss=f"{done.loss:.4f}", lr=f"{done.lr:.2e}", tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False
        )
    bar.update(1)
    if when.save:
        save(run, setup, state)
    stop = done.signalled if d.enabled else bool(signals.pending)  # torchrun: agreed on in the step's all_sum
    if stop:
        path = save(run, setup, state)
        bar.close()
        if d.main:
            print(f"interrupted: saved {path}; continue with --resume --out {run.run_dir}", file=sys.stderr)
        raise Interrupted(signals.pending[0] if signals.pending else signal.SIGTERM)


def evaluate(run: prepare.Run, setup: prepare.Setup, data: prepare.Data, state: RunState) -> float:
    """The eval loss now; a new best one also writes DIR/best_adapter."""
    value = eval_loss(
        setup.model,
        data.eval,
        setup.tokenizer.pad_id,
        run.opts.batch_size,
        run.opts.precision,
        run.d.device,
        setup.replicas,
    )
    if value < state.best_eval:
        state.best_eval = value
        write_adapter(run, setup, run.run_dir / f"best_{output_name(run.opts)}")
    return value


# ---- what is written: adapters and checkpoints -----------------------------------------------------------------------


def output_name(opts) -> str:
    """What a run writes: `adapter` (LoRA), `model` (--full)."""
    return "model" if opts.full else "adapter"


def write_adapter(run: prepare.Run, setup: prepare.Setup, folder: Path) -> None:
    """Every process calls it (FSDP gathers the shards); rank 0 writes."""
    with ckpt.writing(folder, output_name(run.opts)):
        setup.replicas.save_adapter(setup.model, folder, run.opts.base_name)


def save(run: prepare.Run, setup: prepare.Setup, state: RunState) -> Path:
    """A checkpoint of this step (every process calls it: each writes its own part, rank 0 the rest)."""
    opts, d, model, replicas = run.opts, run.d, setup.model, setup.replicas
    own = {"rng": ckpt.rng_state()}
    payload = {
        "scaler": setup.scaler.state_dict(),
        "run": state.__dict__.copy(),
        "rng": own["rng"],
        "options": opts.to_dict(),
        "layout": d.layout,
    }
    if d.sharded:
        own.update(replicas.local_state(model, setup.optimizer))
    elif d.main:
        payload.update(trainable=trainable_state(model), optimizer=setup.optimizer.state_dict())
    gathered = replicas.gather_adapter(model)
    return ckpt.save_checkpoint(
        run.run_dir,
        state.step,
        payload,
        lambda folder: replicas.write_adapter(model, folder, gathered, opts.base_name),
        opts.keep_last,
        own,
        d,
        output=output_name(opts),
    )


# ---- held-out scores and the report ----------------------------------------------------------------------------------


@dataclass
class Report:
    """report.json as it grows (rank 0), and the held-out conversations scored before and after training."""

    data: dict
    held_out: list[list[dict]]


def score_before(run: prepare.Run, setup: prepare.Setup) -> Report:
    """Held-out exact match before training (the base model: LoRA's B starts at zero), unless a resumed run has it.
    Generation runs on rank 0 alone, with the model whole: not under FSDP, where each process holds a shard."""
    opts, d = run.opts, run.d
    report = outputs.read_report(run.report_path) if d.main and run.report_path.exists() else {}
    held_out = _held_out(opts) if d.main and not d.sharded else []
    if d.sharded and (opts.eval_generate or opts.chat_prompt):
        run.log(
            "note: --eval-generate and --chat-prompt are skipped under --distributed fsdp (the model is "
            "sharded); use tools/evaluate.py or tools/chat.py with the adapter"
        )
    if held_out and "exact_match_before" not in report:
        score, _ = exact_match(setup.model, setup.tokenizer, held_out)
        report["exact_match_before"] = score
        outputs.write_json(run.report_path, report)
        run.log(f"held-out exact match before training: {score:.1%} of {len(held_out)}")
    return Report(report, held_out)


def _held_out(opts: TrainOptions) -> list[list[dict]]:
    """Conversations of the held-out file to score by exact match (the first --eval-generate of them)."""
    if not (opts.eval_generate and opts.eval_data):
        return []
    _, (source, columns) = prepare.data_sources(opts)
    located = itertools.islice(source.records(columns), opts.eval_generate)
    return [record_messages(record, where) for where, record in located]


def finish(run: prepare.Run, setup: prepare.Setup, state: RunState, report: Report) -> Path:
    """What the user sees at the end (rank 0; the others are done): the report, the scores after training, the
    reply to --chat-prompt, the loss plot. Everything is written before anything is shown: a terminal that cannot
    show the reply loses no file."""
    opts, d, run_dir, model, tokenizer = run.opts, run.d, run.run_dir, setup.model, setup.tokenizer
    if not d.main:
        return run_dir
    shown, values = [], report.data
    values["train_loss_last"] = state.history[-1][1] if state.history else None
    if state.best_eval < math.inf:
        values["eval_loss_best"] = state.best_eval
    if report.held_out:
        score, rows = exact_match(model, tokenizer, report.held_out)
        values["exact_match_after"] = score
        shown.append(f"held-out exact match after training: {score:.1%} (before: {values['exact_match_before']:.1%})")
        outputs.write_jsonl(run_dir / "predictions.jsonl", rows)
    if opts.chat_prompt and not d.sharded:
        reply = generate_replies(
            model, tokenizer, [[{"role": "user", "content": opts.chat_prompt}]], max_new_tokens=64
        )[0]
        values["chat"] = {"prompt": opts.chat_prompt, "reply": reply}
        shown.append(f"user: {opts.chat_prompt}\nmodel: {reply}")
    with ckpt.writing(run_dir / "loss.png", "loss plot"):
        plot = plot_losses(state.history, run_dir / "loss.png")
    if plot:
        values["loss_plot"] = str(plot)
    outputs.write_json(run.report_path, values)
    for line in shown:
        run.log(line)
    return run_dir
