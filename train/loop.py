"""The training loop: set up, then for each optimizer step accumulate, clip, step, log, maybe eval, maybe save.

The same loop runs in one process or, under torchrun, in every process of a data-parallel job (train.distributed):
each reads its share of every global batch, and the loop adds the few collectives that keep them in step.
"""

from __future__ import annotations

import math
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
import torch
from torch import nn

import gemma
from gemma.errors import GemmaError
from lora import LoraConfig, inject, summary
from lora.inject import module_path
from train import checkpoint as ckpt
from train import distributed, outputs
from train.data import Example, _read_located, collate, load_dataset, pack, plan_epoch, record_messages, shard
from train.loss import IGNORE, chunked_cross_entropy
from train.options import TrainOptions
from train.report import exact_match, generate_replies, plot_losses
from train.schedule import lr_at

NONFINITE_LIMIT = 2  # consecutive non-finite losses (fp32/bf16) that stop the run
FP16_SKIP_LIMIT = 25  # consecutive overflowing fp16 steps that stop the run


@dataclass
class RunState:
    """What advances during training and is saved in checkpoints."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current pass over the data
    batch_in_epoch: int = 0  # optimizer steps done within the current epoch
    best_eval: float = math.inf
    skipped: int = 0  # steps whose update was skipped (non-finite loss or fp16 overflow)
    history: list = field(default_factory=list)  # (step, train loss, eval loss or None) for the plot


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the loop saved a checkpoint and stops."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def default_run_dir(opts: TrainOptions) -> Path:
    name = Path(opts.source).name.removesuffix(".gguf") or "model"
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


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


def accumulate(model, batches: list[dict], n_targets: int, precision: str, device, scaler=None,
               replicas: distributed.Replicas | None = None) -> float:
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
def eval_loss(model, examples: list[Example], pad_id: int, batch_size: int, precision, device,
              replicas: distributed.Replicas | None = None) -> float:
    """Mean loss per target token over `examples`.

    Under torchrun the batches are dealt out to the processes and the sums added up; each process runs the same
    number of forward passes (an empty one when it has run out), since under FSDP each is a collective.
    """
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    order = sorted(range(len(examples)), key=lambda i: len(examples[i].input_ids))
    groups = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if replicas is None or not replicas.d.enabled:
        for group in groups:
            batch = to_device(collate([examples[j] for j in group], pad_id), device)
            loss, n = batch_loss(model, batch, precision, device)
            total, count = total + loss.item(), count + n
    else:
        d = replicas.d
        mine = groups[d.rank::d.world]
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
    device, world, rank = d.device, d.world, d.rank
    with d.agreed_errors():  # rank 0 alone looks at the output folder (the others would race it)
        found = None
        if d.main:
            run_dir = Path(opts.out) if opts.out else default_run_dir(opts)
            found = (run_dir, _check_run_dir(run_dir, opts.resume))
    run_dir, resume_from = d.broadcast(found)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    np.random.seed(opts.seed)

    # ---- model: frozen base in the compute dtype, LoRA weights and optimizer state in fp32 ----
    if opts.precision == "fp16" and device.type == "cpu":
        log("note: fp16 on CPU is slow and overflow-prone; bf16 is the better choice here")
    if opts.distributed == "fsdp" and not d.enabled:
        log("note: --distributed applies under torchrun; this is one process")
    base_dtype = torch.bfloat16 if opts.precision == "bf16" else torch.float32
    with d.agreed_errors():
        model, tokenizer = gemma.load(opts.source, dtype=base_dtype, device="cpu")
        _check_lora_rank(model, opts)
    # Longer sequences would hold positions the model never saw; a larger --max-len only means "no trimming".
    max_len = min(opts.max_len, model.config.max_seq_len)
    if max_len < opts.max_len:
        log(f"note: --max-len {opts.max_len} is above the model's context of {max_len} tokens; using {max_len}")
    lora_cfg = LoraConfig(r=opts.lora_r, alpha=opts.lora_alpha, dropout=opts.lora_dropout, targets=opts.targets,
                          rslora=opts.rslora, dora=opts.dora)
    inject(model, lora_cfg)
    for p in model.parameters():
        if p.requires_grad:  # the adapter trains in float32 whatever the base dtype (autocast does the matmuls)
            p.data = p.data.float()
    # The adapter is drawn on the CPU whatever the device, so a seed gives the same start on CPU and GPU, with or
    # without FSDP, which shards the model from host memory so that no device ever holds all of it.
    if not d.sharded:
        model.to(device)
    log(summary(model))
    model.grad_checkpointing = opts.grad_checkpointing
    model.train()
    if rank:  # every process starts from the same adapter; dropout then draws differently on each
        torch.manual_seed(opts.seed + rank)
    replicas = distributed.Replicas(LossModule(model, opts.precision), model.layers, d, opts.precision)
    params = replicas.params  # FSDP replaces the parameters by their shards

    # ---- data ----
    with d.agreed_errors():
        train_examples, stats = load_dataset(opts.data, tokenizer, max_len, opts.train_on_prompt)
        log(f"train data: {stats.summary()}")
        eval_examples: list[Example] = []
        if opts.eval_data:
            eval_examples, eval_stats = load_dataset(opts.eval_data, tokenizer, max_len, opts.train_on_prompt)
            log(f"eval data: {eval_stats.summary()}")
        elif opts.eval_split > 0:
            order = torch.randperm(len(train_examples), generator=torch.Generator().manual_seed(opts.seed)).tolist()
            n_eval = max(1, int(len(order) * opts.eval_split))
            eval_examples = [train_examples[i] for i in order[:n_eval]]
            train_examples = [train_examples[i] for i in sorted(order[n_eval:])]
        if opts.packing:
            train_examples = pack(train_examples, max_len)
            log(f"packed into {len(train_examples)} sequences of up to {max_len} tokens")
        if not train_examples:
            raise GemmaError(f"{opts.data}: no trainable records after filtering")
    lengths = [len(e.input_ids) for e in train_examples]
    global_batch = opts.batch_size * opts.grad_accum * world
    empty = to_device(collate([_EMPTY], tokenizer.pad_id), device)
    steps_per_epoch = math.ceil(len(train_examples) / global_batch)
    total_steps = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
    warmup = int(opts.warmup_ratio * total_steps)

    # ---- optimizer, scaler, state ----
    optimizer = torch.optim.AdamW(params, lr=opts.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=opts.weight_decay)
    scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
    state = RunState()
    metrics_path = run_dir / "metrics.jsonl"
    if resume_from is not None:
        with d.agreed_errors():
            saved = ckpt.load_checkpoint(resume_from, rank if d.enabled else None)
            _restore(saved, model, optimizer, scaler, state, resume_from, d, replicas)
        if d.main:
            outputs.truncate_metrics(metrics_path, state.step)
        log(f"resumed from {resume_from} at step {state.step}")
    if d.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs.write_json(run_dir / "config.json", {**opts.to_dict(), "resolved": {
            "run_dir": str(run_dir), "device": str(device), "total_steps": total_steps, "warmup_steps": warmup,
            "global_batch": global_batch, "world_size": world, "distributed": d.mode, "max_len": max_len,
            "train_examples": len(train_examples), "eval_examples": len(eval_examples),
            "model_config": model.config.to_dict()}})

    def write_adapter(folder: Path) -> None:  # every process calls it (FSDP gathers the shards); rank 0 writes
        with ckpt.writing(folder, "adapter"):
            replicas.save_adapter(model, folder, opts.source)

    def save() -> Path:
        own = {"rng": ckpt.rng_state()}
        payload = {"scaler": scaler.state_dict(), "run": state.__dict__.copy(), "rng": own["rng"],
                   "options": opts.to_dict(), "layout": d.layout}
        if d.sharded:
            own.update(replicas.local_state(model, optimizer))
        elif d.main:
            payload.update(trainable=trainable_state(model), optimizer=optimizer.state_dict())
        gathered = replicas.gather_adapter(model)
        return ckpt.save_checkpoint(run_dir, state.step, payload,
                                    lambda folder: replicas.write_adapter(model, folder, gathered, opts.source),
                                    opts.keep_last, own, d)

    # ---- signals: finish the current step, save, stop (under torchrun: all processes, at the same step) ----
    pending: list[int] = []

    def on_signal(signum, frame):
        if pending and not d.enabled:  # a second Ctrl-C: stop now (torchrun has its own --shutdown-timeout)
            raise KeyboardInterrupt
        pending.append(signum)

    # ---- held-out exact match before training (the base model: LoRA's B starts at zero) ----
    # Generation runs on rank 0 alone, with the model whole: not under FSDP, where each process holds a shard.
    report_path = run_dir / "report.json"
    report = outputs.read_report(report_path) if d.main and report_path.exists() else {}
    held_out = _held_out(opts) if d.main and not d.sharded else []
    if d.sharded and (opts.eval_generate or opts.chat_prompt):
        log("note: --eval-generate and --chat-prompt are skipped under --distributed fsdp (the model is sharded); "
            "use tools/evaluate.py or tools/chat.py with the adapter")
    if held_out and "exact_match_before" not in report:
        score, _ = exact_match(model, tokenizer, held_out)
        report["exact_match_before"] = score
        outputs.write_json(report_path, report)
        log(f"held-out exact match before training: {score:.1%} of {len(held_out)}")

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    bar = None
    try:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=state.step, desc="train", unit="step", dynamic_ncols=True,
                   disable=not d.main)
        plan = plan_epoch(lengths, global_batch, opts.seed, state.epoch)
        consecutive_bad = 0
        window_tokens, window_start = 0, time.perf_counter()
        while state.step < total_steps:
            if state.batch_in_epoch >= len(plan):
                state.epoch, state.batch_in_epoch = state.epoch + 1, 0
                plan = plan_epoch(lengths, global_batch, opts.seed, state.epoch)
            chosen = plan[state.batch_in_epoch]
            micro = shard(chosen, rank, world, opts.grad_accum)
            batches = [to_device(collate([train_examples[i] for i in mb], tokenizer.pad_id), device) for mb in micro]
            # Normalise by the target tokens of the whole accumulated batch, not per micro-batch.
            n_targets = sum(int((b["targets"] != IGNORE).sum()) for b in batches)
            tokens = sum(int((b["tokens"] != tokenizer.pad_id).sum()) for b in batches)
            if d.enabled:  # ... of all processes; and each runs as many micro-batches as the busiest
                n_targets = int(d.all_sum(n_targets)[0])
                busiest = max(len(shard(chosen, r, world, opts.grad_accum)) for r in range(world))
                batches += [empty] * (busiest - len(batches))
            lr = lr_at(state.step, total_steps, opts.lr, warmup, opts.min_lr_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr

            step_loss = accumulate(model, batches, n_targets, opts.precision, device, scaler, replicas)
            if d.enabled:  # the global loss and tokens, and whether any process got a signal
                step_loss, tokens, signalled = d.all_sum(step_loss, tokens, len(pending))
                stop = signalled > 0
            window_tokens += tokens

            finite = math.isfinite(step_loss)
            if not finite and opts.precision != "fp16":
                consecutive_bad += 1
                state.skipped += 1
                optimizer.zero_grad(set_to_none=True)
                if consecutive_bad >= NONFINITE_LIMIT:
                    last = ckpt.checkpoint_dirs(run_dir)
                    # The loss is global, so every process stops here: an AgreedError, which rank 0 reports.
                    raise distributed.AgreedError(
                        f"non-finite loss at {consecutive_bad} steps in a row (step {state.step + 1}); stopped. "
                        f"Last good checkpoint: {last[-1] if last else 'none'}")
                grad_norm = float("nan")
            else:
                scaler.unscale_(optimizer)  # exactly once per optimizer step
                grad_norm = replicas.clip_grad_norm(opts.max_grad_norm or float("inf"))
                scale_before = scaler.get_scale() if scaler.is_enabled() else None
                scaler.step(optimizer)
                scaler.update()
                optimizer.zero_grad(set_to_none=True)
                if scaler.is_enabled() and scaler.get_scale() < scale_before:
                    state.skipped += 1  # overflow: the scaler skipped this update and lowered its scale
                    consecutive_bad += 1
                    if consecutive_bad >= FP16_SKIP_LIMIT:
                        raise distributed.AgreedError(
                            f"fp16 overflow at {consecutive_bad} steps in a row; use --precision bf16")
                else:
                    consecutive_bad = 0
            state.step += 1
            state.batch_in_epoch += 1

            # ---- log, eval, save ----
            record = None
            last_step = state.step == total_steps
            if state.step % opts.log_every == 0 or last_step:
                elapsed = time.perf_counter() - window_start
                record = {"step": state.step, "epoch": state.epoch + state.batch_in_epoch / max(len(plan), 1),
                          "loss": step_loss, "lr": lr, "grad_norm": grad_norm,
                          "tokens_per_s": window_tokens / max(elapsed, 1e-9), "skipped_steps": state.skipped}
                if device.type == "cuda":
                    record["memory_gb"] = torch.cuda.max_memory_allocated(device) / 1e9  # rank 0's peak
                window_tokens, window_start = 0, time.perf_counter()
            eval_value = None
            if eval_examples and ((opts.eval_every and state.step % opts.eval_every == 0) or last_step):
                eval_value = eval_loss(model, eval_examples, tokenizer.pad_id, opts.batch_size, opts.precision,
                                       device, replicas)
                record = {**(record or {"step": state.step, "loss": step_loss, "lr": lr}), "eval_loss": eval_value}
                if eval_value < state.best_eval:
                    state.best_eval = eval_value
                    write_adapter(run_dir / "best_adapter")
            if record is not None:
                state.history.append((state.step, step_loss, eval_value))
                if d.main:
                    outputs.append_metrics(metrics_path, record)
                bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{lr:.2e}",
                                tok_s=f"{record.get('tokens_per_s', 0):.0f}", refresh=False)
            bar.update(1)
            if opts.save_every and state.step % opts.save_every == 0 and not last_step:
                save()
            if not d.enabled:
                stop = bool(pending)
            if stop:
                path = save()
                bar.close()
                if d.main:
                    print(f"interrupted: saved {path}; continue with --resume --out {run_dir}", file=sys.stderr)
                raise Interrupted(pending[0] if pending else signal.SIGTERM)
        bar.close()
        save()
        write_adapter(run_dir / "adapter")
    finally:
        if bar is not None:  # an error line must start a line of its own, not follow the bar
            bar.close()
        for s, handler in previous.items():
            signal.signal(s, handler)

    # ---- what the user sees at the end (rank 0; the others are done) ----
    if not d.main:
        return run_dir
    # Everything is written before anything is shown: a terminal that cannot show the reply loses no file.
    shown = []
    report["train_loss_last"] = state.history[-1][1] if state.history else None
    if state.best_eval < math.inf:
        report["eval_loss_best"] = state.best_eval
    if held_out:
        score, rows = exact_match(model, tokenizer, held_out)
        report["exact_match_after"] = score
        shown.append(f"held-out exact match after training: {score:.1%} (before: {report['exact_match_before']:.1%})")
        outputs.write_jsonl(run_dir / "predictions.jsonl", rows)
    if opts.chat_prompt and not d.sharded:
        reply = generate_replies(model, tokenizer, [[{"role": "user", "content": opts.chat_prompt}]],
                                 max_new_tokens=64)[0]
        report["chat"] = {"prompt": opts.chat_prompt, "reply": reply}
        shown.append(f"user: {opts.chat_prompt}\nmodel: {reply}")
    with ckpt.writing(run_dir / "loss.png", "loss plot"):
        plot = plot_losses(state.history, run_dir / "loss.png")
    if plot:
        report["loss_plot"] = str(plot)
    outputs.write_json(report_path, report)
    for line in shown:
        log(line)
    return run_dir


def _held_out(opts: TrainOptions) -> list[list[dict]]:
    """Conversations of the held-out file to score by exact match (the first --eval-generate of them)."""
    if not (opts.eval_generate and opts.eval_data):
        return []
    located = _read_located(opts.eval_data)[:opts.eval_generate]
    return [record_messages(record, where) for where, record in located]


def _check_run_dir(run_dir: Path, resume: bool) -> Path | None:
    """The checkpoint to resume from, or None for a fresh run; refuses to overwrite a finished or started run, and
    an output folder it cannot write (before any work, not at the first save). Clears what killed saves left."""
    if run_dir.exists() and not run_dir.is_dir():
        raise GemmaError(f"{run_dir}: exists and is not a folder")
    if resume and not run_dir.is_dir():
        raise GemmaError(f"{run_dir}: no checkpoint to resume from")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_bytes(b"")
        probe.unlink()
        ckpt.recover(run_dir)
    except OSError as exc:
        raise GemmaError(f"{run_dir}: cannot write the output folder ({exc.strerror or exc})") from None
    found = ckpt.checkpoint_dirs(run_dir)
    if resume:
        if not found:
            raise GemmaError(f"{run_dir}: no checkpoint to resume from")
        return found[-1]
    if found or (run_dir / "adapter").exists():
        raise GemmaError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    return None


def _check_lora_rank(model, opts: TrainOptions) -> None:
    """A rank above a projection's smaller side cannot raise the rank of its update B @ A; it only adds parameters
    and, through alpha / r, shrinks the update: refused, naming the narrowest projection."""
    for i in range(len(model.layers)):
        for target in opts.targets:
            path = module_path(i, target)
            out_features, in_features = model.get_submodule(path).weight.shape
            width = min(in_features, out_features)
            if opts.lora_r > width:
                raise GemmaError(f"--lora-r {opts.lora_r} is above the width {width} of {path} ({in_features} in, "
                                 f"{out_features} out); choose at most {width} or leave {target!r} out of "
                                 "--lora-targets")


def _restore(saved, model, optimizer, scaler, state: RunState, where: Path, d: distributed.Dist,
             replicas: distributed.Replicas) -> None:
    """Put the checkpoint's state into this run; one that lacks a part or holds one of another shape (a file that
    loads but was not written by this code) is a GemmaError naming the folder."""
    try:
        _restore_parts(saved, model, optimizer, scaler, state, where, d, replicas)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else (str(exc).splitlines() or [""])[0]
        raise GemmaError(f"{where}: not a checkpoint this run can resume ({type(exc).__name__}: {detail})") from None


def _restore_parts(saved, model, optimizer, scaler, state: RunState, where: Path, d: distributed.Dist,
                   replicas: distributed.Replicas) -> None:
    ckpt.check_layout(saved, d.layout, where)
    own = saved.get("own", {})
    if d.sharded:
        replicas.load_local_state(model, optimizer, own, where)
    else:
        named = dict(model.named_parameters())
        trainable = saved["trainable"]
        expected = {n for n, p in named.items() if p.requires_grad}
        if set(trainable) != expected:
            raise GemmaError(f"{where}: the checkpoint's adapter does not match this run's LoRA settings")
        for name, tensor in trainable.items():
            if named[name].shape != tensor.shape:
                raise GemmaError(f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, this run needs "
                                 f"{tuple(named[name].shape)}")
            with torch.no_grad():
                named[name].copy_(tensor)
        optimizer.load_state_dict(saved["optimizer"])
    scaler.load_state_dict(saved["scaler"])
    for key in state.__dataclass_fields__:
        setattr(state, key, saved["run"][key])
    ckpt.set_rng_state(own.get("rng", saved["rng"]))
