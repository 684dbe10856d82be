"""The stages of a run before its first step, in the order train.loop calls them: the run folder and the seeds, the
model with its adapter, the data and the number of steps, a checkpoint to resume, config.json.

Under torchrun every process runs each stage; what only some processes may get wrong (a file, a rank's checkpoint)
runs under `d.agreed_errors()`, so that all of them stop at the same point.
"""

from __future__ import annotations

import math
import os
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import torch

import gemma
from gemma.errors import GemmaError
from gemma.formats.load import read_config
from lora import LoraConfig, inject, summary
from lora.inject import module_path
from train import checkpoint as ckpt
from train import distributed, outputs
from train.data import Example
from train.full import make_trainable, parse_modules
from train.mixture import Examples, mix, packed
from train.options import TrainOptions
from train.records import check_columns, file_columns, parse_columns
from train.sources import Source, parse_source
from train.step import RunState


@dataclass
class Run:
    """One run as this process sees it."""

    opts: TrainOptions
    d: distributed.Dist  # where this process stands (one process, or a rank under torchrun)
    log: Callable[[str], None]  # rank 0's log; the other processes' is quiet
    run_dir: Path  # the output folder
    resume_from: Path | None  # the checkpoint to continue from; None for a fresh run

    @property
    def metrics_path(self) -> Path:
        return self.run_dir / "metrics.jsonl"

    @property
    def report_path(self) -> Path:
        return self.run_dir / "report.json"


@dataclass
class Setup:
    """The model and what trains it (built by train.loop.build_setup)."""

    model: gemma.Gemma  # frozen base in the compute dtype, the adapter in float32
    tokenizer: object
    max_len: int  # --max-len, at most the model's context
    replicas: distributed.Replicas  # the loss as this process runs it: as is, under DDP or sharded by FSDP
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler  # enabled for fp16 only
    empty: dict  # on the device: the micro-batch of a process that has run out of data while the others have not


@dataclass
class Data:
    """The examples and the plan sizes that follow from them."""

    train: Sequence[Example]  # train.mixture's Examples or Packed: an index over the cache, examples built on demand
    eval: Sequence[Example]  # from --eval-data or --eval-split; may be empty
    lengths: Sequence[int]  # tokens of each training sequence (an array), which plan_epoch groups by
    global_batch: int  # sequences per optimizer step over all processes
    total_steps: int
    warmup: int  # steps of linear warmup


def default_run_dir(opts: TrainOptions) -> Path:
    name = Path(opts.source).name.removesuffix(".gguf") or "model"
    return Path("runs") / f"{name}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def start_run(opts: TrainOptions, d: distributed.Dist, log) -> Run:
    """The output folder (checked by rank 0 alone: the others would race it) and the seeds. A precision the model
    cannot train in is refused first, before anything is written."""
    with d.agreed_errors():
        check_precision(opts)
        found = None
        if d.main:
            run_dir = Path(opts.out) if opts.out else default_run_dir(opts)
            found = (run_dir, check_run_dir(run_dir, opts.resume))
    run_dir, resume_from = d.broadcast(found)
    torch.manual_seed(opts.seed)
    random.seed(opts.seed)
    np.random.seed(opts.seed)
    return Run(opts, d, log, run_dir, resume_from)


def check_run_dir(run_dir: Path, resume: bool) -> Path | None:
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
    if found or (run_dir / "adapter").exists() or (run_dir / "model").exists():
        raise GemmaError(f"{run_dir}: already holds a run; pass --resume to continue it or choose another --out")
    return None


# ---- the model -------------------------------------------------------------------------------------------------------


def check_precision(opts: TrainOptions) -> None:
    """Refuse --precision fp16 for a model whose activations overflow it (its config says so), before the weights
    are read: it would train into inf and NaN."""
    if opts.precision == "fp16" and read_config(opts.source).fp16_overflows:
        raise GemmaError(
            "--precision fp16: this model's activations (Gemma 3 and later) exceed fp16's largest value (65504), "
            "so training would turn into inf and NaN; use --precision bf16 (or fp32)"
        )


def load_model(run: Run):
    """(model, tokenizer, max_len): the frozen base in the compute dtype with a float32 adapter, in training mode,
    on this process's device (under FSDP still on the CPU: it is sharded from host memory)."""
    opts, d, log = run.opts, run.d, run.log
    if opts.precision == "fp16" and d.device.type == "cpu":
        log("note: fp16 on CPU is slow and overflow-prone; bf16 is the better choice here")
    if opts.distributed == "fsdp" and not d.enabled:
        log("note: --distributed applies under torchrun; this is one process")
    # LoRA: the frozen base in the compute dtype. --full: float32 master weights (autocast computes in bf16).
    base_dtype = torch.bfloat16 if opts.precision == "bf16" and not opts.full else torch.float32
    with d.agreed_errors():
        if opts.base_quant != "none" and d.sharded:
            raise GemmaError(
                f"--base-quant {opts.base_quant} with --distributed fsdp: a quantized base is not sharded; use "
                "--distributed ddp (each process holds the quantized base, a quarter of its bf16 size)"
            )
        model, tokenizer = gemma.load(opts.source, dtype=base_dtype, device="cpu")
        if opts.full:
            make_trainable(model, parse_modules(opts.train_modules))
        else:
            check_lora_rank(model, opts)
    # Longer sequences would hold positions the model never saw; a larger --max-len only means "no trimming".
    max_len = min(opts.max_len, model.config.max_seq_len)
    if max_len < opts.max_len:
        log(f"note: --max-len {opts.max_len} is above the model's context of {max_len} tokens; using {max_len}")
    if not opts.full:
        _inject(model, opts)
    # The adapter is drawn on the CPU whatever the device, so a seed gives the same start on CPU and GPU, with or
    # without FSDP, which shards the model from host memory so that no device ever holds all of it.
    if not d.sharded:
        model.to(d.device)
    log(summary(model))
    model.grad_checkpointing = opts.grad_checkpointing
    model.train()
    if d.rank:  # every process starts from the same adapter; dropout then draws differently on each
        torch.manual_seed(opts.seed + d.rank)
    return model, tokenizer, max_len


def _inject(model, opts: TrainOptions) -> None:
    """The LoRA adapter (float32) over the frozen base, the base quantized under it with --base-quant."""
    inject(
        model,
        LoraConfig(
            r=opts.lora_r,
            alpha=opts.lora_alpha,
            dropout=opts.lora_dropout,
            targets=opts.targets,
            rslora=opts.rslora,
            dora=opts.dora,
        ),
    )
    if opts.base_quant != "none":
        from gemma.model.base_quant import quantize_base

        quantize_base(model, opts.base_quant, embed=opts.base_quant_embed)
    for p in model.parameters():
        if p.requires_grad:  # the adapter trains in float32 whatever the base dtype (autocast does the matmuls)
            p.data = p.data.float()


def check_lora_rank(model, opts: TrainOptions) -> None:
    """A rank above a projection's smaller side cannot raise the rank of its update B @ A; it only adds parameters
    and, through alpha / r, shrinks the update: refused, naming the narrowest projection."""
    for i in range(len(model.layers)):
        for target in opts.targets:
            path = module_path(i, target)
            parent, _, name = path.rpartition(".")
            projection = getattr(model.get_submodule(parent), name)
            if projection is None:  # a projection the layer lacks (Gemma 4's keys-equal-values layers: no v)
                continue
            out_features, in_features = projection.weight.shape
            width = min(in_features, out_features)
            if opts.lora_r > width:
                raise GemmaError(
                    f"--lora-r {opts.lora_r} is above the width {width} of {path} ({in_features} in, "
                    f"{out_features} out); choose at most {width} or leave {target!r} out of "
                    "--lora-targets"
                )


# ---- the data --------------------------------------------------------------------------------------------------------


def load_data(run: Run, tokenizer, max_len: int) -> Data:
    """The training and eval sets over the tokenize-once cache. Under torchrun the first process of each machine
    (LOCAL_RANK 0) builds what the cache lacks while the others wait, then they all read it."""
    opts, d = run.opts, run.d
    builder = int(os.environ.get("LOCAL_RANK", "0")) == 0 if d.enabled else True
    opened = None
    with d.agreed_errors():  # its exchange at the end is the wait
        if builder:
            opened = open_sources(opts, tokenizer, max_len, run.log)
    with d.agreed_errors():
        if not builder:
            opened = open_sources(opts, tokenizer, max_len, run.log)
        train, eval_ = assemble(opts, *opened, max_len, run.log)
    global_batch, total_steps, warmup = plan_sizes(len(train), opts, d.world)
    return Data(train, eval_, train.lengths, global_batch, total_steps, warmup)


def read_data(opts: TrainOptions, tokenizer, max_len: int, log) -> tuple[Sequence[Example], Sequence[Example]]:
    """(training examples, eval examples) of one process: the sources through the cache, mixed, split, packed."""
    return assemble(opts, *open_sources(opts, tokenizer, max_len, log), max_len, log)


def data_sources(opts: TrainOptions) -> tuple[list[tuple[Source, dict]], tuple[Source, dict] | None]:
    """(each --data source with its column map, --eval-data's or None)."""
    sources = [parse_source(spec) for spec in opts.data]
    maps = [parse_columns(c) for c in opts.columns]
    maps = maps * len(sources) if len(maps) == 1 else maps or [{}] * len(sources)
    eval_source = None
    if opts.eval_data:
        source = parse_source(opts.eval_data, "--eval-data")
        if source.weight is not None or source.count is not None:
            raise GemmaError(f"--eval-data {opts.eval_data}: eval data takes no mixture weight or count")
        eval_source = (source, maps[0] if len(opts.columns) == 1 else {})
    return list(zip(sources, maps)), eval_source


def open_sources(opts: TrainOptions, tokenizer, max_len: int, log):
    """(the cache entries of --data with their shares, --eval-data's entry or None): read, or built now."""
    from train.cache import Encoding, default_root, open_or_build, tokenizer_fingerprint

    sources, eval_source = data_sources(opts)
    root = Path(opts.data_cache).expanduser() if opts.data_cache else default_root()
    encoding = Encoding(tokenizer_fingerprint(tokenizer), max_len, opts.train_on_prompt, opts.train_on_thoughts)
    processes = opts.num_proc or min(8, os.cpu_count() or 1)

    def entry(source: Source, columns: dict, role: str):
        files = source.files()
        for path in files:
            names = file_columns(path)
            if names is not None:
                check_columns(str(path), names, columns)
        store, built = open_or_build(root, source.spec, files, columns, encoding, tokenizer, processes, log)
        log(f"{role} data {source.spec}: {store.stats.summary()}{'' if built else ' (from the cache)'}")
        return store

    stores = [(entry(source, columns, "train"), source) for source, columns in sources]
    eval_store = entry(*eval_source, "eval") if eval_source else None
    return stores, eval_store


def assemble(opts: TrainOptions, stores, eval_store, max_len: int, log):
    """(train, eval) from opened entries: the mixture drawn, --eval-data or --eval-split, packing."""
    shares = [source.draws(len(store)) for store, source in stores]
    split = opts.eval_split if eval_store is None else 0.0
    train, eval_ = mix([store for store, _ in stores], shares, opts.seed, split)
    if eval_store is not None:
        eval_ = Examples([eval_store], np.arange(len(eval_store)))
    if len(stores) > 1 or any(share != 1.0 for share in shares):
        counts = ", ".join(
            f"{source.spec}: {int(np.isin(train.rows, np.arange(len(store)) + start).sum())}"
            for (store, source), start in zip(stores, train.starts)
        )
        log(f"mixture of {len(train)} examples per epoch ({counts})")
    if opts.packing:
        train = packed(train, max_len)
        log(f"packed into {len(train)} sequences of up to {max_len} tokens")
    if not len(train):
        raise GemmaError(f"{', '.join(opts.data)}: no trainable records after filtering")
    return train, eval_


def plan_sizes(n_examples: int, opts: TrainOptions, world: int) -> tuple[int, int, int]:
    """(global batch, total steps, warmup steps): --max-steps, else --epochs over the data."""
    global_batch = opts.batch_size * opts.grad_accum * world
    steps_per_epoch = math.ceil(n_examples / global_batch)
    total_steps = opts.max_steps or max(1, math.ceil(opts.epochs * steps_per_epoch))
    return global_batch, total_steps, int(opts.warmup_ratio * total_steps)


# ---- a checkpoint to resume, and config.json -------------------------------------------------------------------------


def resume(run: Run, setup: Setup, state: RunState) -> None:
    """Continue from `run.resume_from`: its state into this run, metrics.jsonl cut back to its step."""
    d = run.d
    with d.agreed_errors():
        saved = ckpt.load_checkpoint(run.resume_from, d.rank if d.enabled else None)
        restore(saved, setup, state, run.resume_from, d)
    if d.main:
        outputs.truncate_metrics(run.metrics_path, state.step)
    run.log(f"resumed from {run.resume_from} at step {state.step}")


def restore(saved: dict, setup: Setup, state: RunState, where: Path, d: distributed.Dist) -> None:
    """Put the checkpoint's state into this run; one that lacks a part or holds one of another shape (a file that
    loads but was not written by this code) is a GemmaError naming the folder."""
    try:
        _restore_parts(saved, setup, state, where, d)
    except (KeyError, TypeError, ValueError, IndexError, RuntimeError) as exc:
        detail = f"missing {exc}" if isinstance(exc, KeyError) else (str(exc).splitlines() or [""])[0]
        raise GemmaError(f"{where}: not a checkpoint this run can resume ({type(exc).__name__}: {detail})") from None


def _restore_parts(saved: dict, setup: Setup, state: RunState, where: Path, d: distributed.Dist) -> None:
    ckpt.check_layout(saved, d.layout, where)
    own = saved.get("own", {})
    if d.sharded:
        setup.replicas.load_local_state(setup.model, setup.optimizer, own, where)
    else:
        named = dict(setup.model.named_parameters())
        trainable = saved["trainable"]
        expected = {n for n, p in named.items() if p.requires_grad}
        if set(trainable) != expected:
            raise GemmaError(f"{where}: the checkpoint's adapter does not match this run's LoRA settings")
        for name, tensor in trainable.items():
            if named[name].shape != tensor.shape:
                raise GemmaError(
                    f"{where}: tensor {name!r} has shape {tuple(tensor.shape)}, this run needs "
                    f"{tuple(named[name].shape)}"
                )
            with torch.no_grad():
                named[name].copy_(tensor)
        setup.optimizer.load_state_dict(saved["optimizer"])
    setup.scaler.load_state_dict(saved["scaler"])
    for key in state.__dataclass_fields__:
        setattr(state, key, saved["run"][key])
    ckpt.set_rng_state(own.get("rng", saved["rng"]))


def write_config(run: Run, setup: Setup, data: Data) -> None:
    """config.json: the options, and what they resolved to (rank 0)."""
    d = run.d
    if not d.main:
        return
    run.run_dir.mkdir(parents=True, exist_ok=True)
    outputs.write_json(
        run.run_dir / "config.json",
        {
            **run.opts.to_dict(),
            "resolved": {
                "run_dir": str(run.run_dir),
                "device": str(d.device),
                "total_steps": data.total_steps,
                "warmup_steps": data.warmup,
                "global_batch": data.global_batch,
                "world_size": d.world,
                "distributed": d.mode,
                "max_len": setup.max_len,
                "train_examples": len(data.train),
                "eval_examples": len(data.eval),
                "model_config": setup.model.config.to_dict(),
            },
        },
    )
