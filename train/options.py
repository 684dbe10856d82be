"""Every flag of `python -m train.sft`, typed and documented in one place.

The dataclass is the resolved run configuration (written to DIR/config.json); the argparse parser is generated
from it. A `--config FILE` (YAML or JSON) sets fields; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma.errors import GemmaError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainOptions:
    # what to train
    size: str | None = _opt(None, "model preset (2b 7b 2-2b 2-9b 2-27b 3-270m 3-1b 3-4b 3-12b 3-27b)")
    model: str | None = _opt(None, "model source: HF folder, native folder, .gguf, HF repo id (default: --size, "
                                   "else 3-270m)")
    data: str = _opt(str(EXAMPLES / "arith_train.jsonl"), "training data (JSON or JSONL; alpaca, sharegpt or "
                                                          "messages records)")
    eval_data: str | None = _opt(None, "held-out data for eval loss (and exact match with --eval-generate)")
    eval_split: float = _opt(0.0, "hold out this fraction of --data for evaluation when --eval-data is not given")
    out: str | None = _opt(None, "output folder (default runs/<model>-<time>)")
    # how long
    epochs: float = _opt(1.0, "passes over the data (ignored when --max-steps is set)")
    max_steps: int | None = _opt(None, "optimizer steps to run")
    # batching
    batch_size: int = _opt(4, "sequences per micro-batch (per process)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_len: int = _opt(512, "tokens per sequence; longer records have their content trimmed")
    packing: bool = _opt(False, "pack several records into each sequence (attention stays within a record)")
    train_on_prompt: bool = _opt(False, "also train on the prompt tokens, not only the model turns")
    # optimisation
    lr: float = _opt(2e-4, "peak learning rate (AdamW)")
    warmup_ratio: float = _opt(0.03, "fraction of the steps spent warming up linearly (then cosine decay)")
    min_lr_ratio: float = _opt(0.0, "final learning rate as a fraction of --lr")
    weight_decay: float = _opt(0.0, "AdamW weight decay on the adapter")
    max_grad_norm: float = _opt(1.0, "clip the gradient norm (0 disables)")
    # LoRA
    lora_r: int = _opt(16, "LoRA rank")
    lora_alpha: float = _opt(32.0, "LoRA alpha (scale alpha / r, or alpha / sqrt(r) with --rslora)")
    lora_dropout: float = _opt(0.05, "dropout on the LoRA input")
    lora_targets: str = _opt(",".join(LORA_TARGETS), "projections to adapt, a comma list of q,k,v,o,gate,up,down")
    rslora: bool = _opt(False, "rank-stabilised scaling alpha / sqrt(r)")
    dora: bool = _opt(False, "weight-decomposed LoRA (DoRA)")
    # numerics and memory
    precision: str = _opt("bf16", "fp32 | bf16 | fp16 (fp16 uses a gradient scaler)", choices=("fp32", "bf16", "fp16"))
    grad_checkpointing: bool = _opt(False, "recompute block activations in the backward pass (less memory)")
    device: str | None = _opt(None, "cpu, cuda, cuda:N (default: cuda when available)")
    distributed: str = _opt("ddp", "under torchrun: ddp | fsdp", choices=("ddp", "fsdp"))
    dist_timeout: int = _opt(1800, "under torchrun: seconds a process waits for the others in a collective before "
                                   "the job fails")
    seed: int = _opt(0, "seed for LoRA init, data order and dropout")
    # logging, evaluation, checkpoints
    log_every: int = _opt(1, "write a metrics line every N steps")
    eval_every: int = _opt(0, "eval loss every N steps (0: only at the end)")
    eval_generate: int = _opt(0, "score exact match on this many held-out records before and after training")
    save_every: int = _opt(0, "checkpoint every N steps (0: only at the end)")
    keep_last: int = _opt(2, "checkpoints to keep")
    resume: bool = _opt(False, "continue from the newest checkpoint in --out")
    chat_prompt: str | None = _opt(None, "after training, answer this prompt with the tuned model and print it")
    config: str | None = _opt(None, "YAML or JSON file of options; command-line flags override it")

    def __post_init__(self):
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.max_len >= 8, "--max-len must be at least 8"),
            (self.lr > 0, "--lr must be positive"),
            (self.epochs > 0, "--epochs must be positive"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)"),
            (0.0 <= self.eval_split < 1.0, "--eval-split must be in [0, 1)"),
            (0.0 <= self.warmup_ratio < 1.0, "--warmup-ratio must be in [0, 1)"),
            (self.keep_last >= 1, "--keep-last must be at least 1"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.precision in ("fp32", "bf16", "fp16"), f"unknown --precision {self.precision!r}"),
            (self.distributed in ("ddp", "fsdp"), f"unknown --distributed {self.distributed!r}"),
            (self.dist_timeout >= 1, "--dist-timeout must be at least 1 second"),
        ]
        for ok, message in checks:
            if not ok:
                raise GemmaError(message)
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise GemmaError(f"--lora-targets: unknown target {bad[0]!r}" if bad else "--lora-targets is empty")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def source(self) -> str:
        return self.model or self.size or "3-270m"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m train.sft", description="LoRA supervised fine-tuning of Gemma.",
                                     argument_default=argparse.SUPPRESS)
    for f in dataclasses.fields(TrainOptions):
        help_text, kw = f.metadata["help"], {k: v for k, v in f.metadata.items() if k != "help"}
        if f.type in ("bool", bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(_flag(f.name), type=kind, help=f"{help_text} (default: {f.default})", **kw)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise GemmaError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
    try:
        if p.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # yaml and json raise their own error types
        raise GemmaError(f"{path}: not valid {'YAML' if p.suffix.lower() in ('.yaml', '.yml') else 'JSON'} "
                         f"({str(exc).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise GemmaError(f"{path}: expected a mapping of option names to values")
    types = {f.name: str(f.type) for f in dataclasses.fields(TrainOptions)}
    out = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in types or name == "config":
            raise GemmaError(f"{path}: unknown option {key!r}")
        out[name] = _coerce(value, types[name], f"{path}: option {key!r}")
    return out


def _coerce(value, kind: str, where: str):
    """A config-file value as the field's type (YAML reads 1e-3 as a string, JSON has no int/float split)."""
    if value is None:
        if "None" in kind:
            return None
        raise GemmaError(f"{where} cannot be empty")
    base = kind.split("|")[0].strip()
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if base == "int":
            if isinstance(value, bool) or float(value) != int(float(value)):
                raise ValueError
            return int(float(value))
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise GemmaError(f"{where} must be {base}, got {value!r}") from None


def parse_options(argv: list[str] | None = None) -> TrainOptions:
    """Flags over --config over defaults."""
    args = vars(build_parser().parse_args(argv))
    values = _read_config_file(args["config"]) if args.get("config") else {}
    values.update(args)
    try:
        return TrainOptions(**values)
    except TypeError as exc:
        raise GemmaError(f"bad option: {exc}") from None
