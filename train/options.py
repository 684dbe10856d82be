"""Every flag of `python -m train.sft`, typed and documented in one place.

The dataclass is the resolved run configuration (written to DIR/config.json); the argparse parser is generated
from it. A `--config FILE` (YAML or JSON) sets fields; flags given on the command line override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gemma.errors import GemmaError
from gemma.files import has_lone_surrogate, loads_strict, read_bytes
from lora.config import ALL_TARGETS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
MAX_SEED = 2**32 - 1  # numpy's seeds are 32-bit
MAX_EPOCHS = 10**6  # a bound that keeps epochs x steps per epoch a float we can count up to
MAX_DIST_TIMEOUT = 10**9  # seconds (31 years); far larger values overflow the timedelta of the process group


def _opt(default, help: str, **kw):
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class TrainOptions:
    # what to train
    size: str | None = _opt(
        None, "model preset (2b 7b 2-2b 2-9b 2-27b 3-270m 3-1b 3-4b 3-12b 3-27b 4-e2b 4-e4b 4-12b 4-26b-a4b 4-31b)"
    )
    model: str | None = _opt(
        None, "model source: HF folder, native folder, .gguf, HF repo id (default: --size, else 3-270m)"
    )
    data: list[str] = field(
        default_factory=lambda: [str(EXAMPLES / "arith_train.jsonl")],
        metadata={
            "help": "training data, repeatable (a mixture): a JSON/JSONL/Parquet/CSV/Arrow file, a folder of them, "
            "or a hub dataset org/name[:config[:split]]; @WEIGHT samples it at that rate, #COUNT takes that many "
            "records (alpaca, sharegpt or messages records)"
        },
    )
    columns: list[str] = field(
        default_factory=list,
        metadata={
            "help": "column map FIELD=COLUMN,... (e.g. instruction=query,output=answer): given once it applies to "
            "every source, given once per --data to each in order ('auto': detect)"
        },
    )
    eval_data: str | None = _opt(
        None, "held-out data for eval loss (and exact match with --eval-generate); a source as --data takes"
    )
    eval_split: float = _opt(0.0, "hold out this fraction of the mixture for evaluation when --eval-data is not given")
    data_cache: str | None = _opt(
        None, "folder of the tokenize-once cache (default $GEMMA_SFT_CACHE, else ~/.cache/gemma-sft/data)"
    )
    num_proc: int = _opt(0, "processes that encode the data into the cache (0: one per CPU core, at most 8)")
    out: str | None = _opt(None, "output folder (default runs/<model>-<time>)")
    # how long
    epochs: float = _opt(1.0, "passes over the data (ignored when --max-steps is set)")
    max_steps: int | None = _opt(None, "optimizer steps to run")
    # batching
    batch_size: int = _opt(4, "sequences per micro-batch (per process)")
    grad_accum: int = _opt(1, "micro-batches per optimizer step")
    max_len: int = _opt(
        512,
        "tokens per sequence, at most the model's context (a larger value is lowered to it); "
        "longer records have their content trimmed",
    )
    packing: bool = _opt(False, "pack several records into each sequence (attention stays within a record)")
    train_on_prompt: bool = _opt(False, "also train on the prompt tokens, not only the model turns")
    train_on_thoughts: bool = _opt(
        True, "Gemma 4: train on the model turns' thoughts (reasoning_content) too; --no-train-on-thoughts masks them"
    )
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
    lora_targets: str = _opt(",".join(ALL_TARGETS), f"projections to adapt, a comma list of {','.join(ALL_TARGETS)}")
    rslora: bool = _opt(False, "rank-stabilised scaling alpha / sqrt(r)")
    dora: bool = _opt(False, "weight-decomposed LoRA (DoRA)")
    base_quant: str = _opt(
        "none",
        "store the frozen base's projections quantized, LoRA over them (QLoRA): nf4 (4-bit NormalFloat, double "
        "quantized) | int8 (per-row) | none",
        choices=("none", "nf4", "int8"),
    )
    base_quant_embed: bool = _opt(
        False,
        "with --base-quant: quantize the embedding (also the tied output head) too; by default it stays bf16, as "
        "the head's logits are what the loss reads",
    )
    full: bool = _opt(False, "full fine-tuning: the model's own weights train (no adapter); writes a model folder")
    train_modules: str = _opt(
        "all", "with --full: which weights train, a comma list of embeddings,norms,attention,mlp, or all"
    )
    save_format: str = _opt("hf", "with --full: the model folder's format, hf | native", choices=("hf", "native"))
    # numerics and memory
    precision: str = _opt("bf16", "fp32 | bf16 | fp16 (fp16 uses a gradient scaler)", choices=("fp32", "bf16", "fp16"))
    grad_checkpointing: bool = _opt(False, "recompute block activations in the backward pass (less memory)")
    device: str | None = _opt(None, "cpu, cuda, cuda:N (default: cuda when available)")
    distributed: str = _opt("ddp", "under torchrun: ddp | fsdp", choices=("ddp", "fsdp"))
    dist_timeout: int = _opt(
        1800, "under torchrun: seconds a process waits for the others in a collective before the job fails"
    )
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
        if isinstance(self.data, str):  # the Python API and config files may name one source
            self.data = [self.data]
        if isinstance(self.columns, str):
            self.columns = [self.columns]
        self.data, self.columns = [str(d) for d in self.data], [str(c) for c in self.columns]
        # Every float finite first: an inf or NaN would not stop the run but quietly train something else, and NaN
        # passes a check written as `not x <= 0` (every comparison with NaN is False).
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise GemmaError(f"{_flag(f.name)} must be a finite number, got {value}")
        checks = [
            (self.batch_size >= 1, "--batch-size must be at least 1"),
            (self.grad_accum >= 1, "--grad-accum must be at least 1"),
            (self.max_len >= 8, "--max-len must be at least 8"),
            (self.lr > 0, "--lr must be positive"),
            (0 < self.epochs <= MAX_EPOCHS, f"--epochs must be positive and at most {MAX_EPOCHS}"),
            (self.max_steps is None or self.max_steps >= 1, "--max-steps must be at least 1"),
            (0.0 <= self.min_lr_ratio <= 1.0, "--min-lr-ratio must be in [0, 1]"),
            (self.weight_decay >= 0, "--weight-decay must be at least 0"),
            (self.max_grad_norm >= 0, "--max-grad-norm must be at least 0 (0 disables clipping)"),
            (self.lora_r >= 1, "--lora-r must be at least 1"),
            (self.lora_alpha > 0, "--lora-alpha must be positive"),
            (0.0 <= self.lora_dropout < 1.0, "--lora-dropout must be in [0, 1)"),
            (0.0 <= self.eval_split < 1.0, "--eval-split must be in [0, 1)"),
            (0.0 <= self.warmup_ratio < 1.0, "--warmup-ratio must be in [0, 1)"),
            (0 <= self.seed <= MAX_SEED, f"--seed must be in [0, {MAX_SEED}]"),
            (self.keep_last >= 1, "--keep-last must be at least 1"),
            (bool(self.data), "--data: no data source"),
            (len(self.columns) in (0, 1, len(self.data)), "--columns: give it once, or once per --data"),
            (0 <= self.num_proc <= 256, "--num-proc must be between 0 (one per core) and 256"),
            (self.log_every >= 1, "--log-every must be at least 1"),
            (self.eval_every >= 0, "--eval-every must be at least 0 (0: only at the end)"),
            (self.eval_generate >= 0, "--eval-generate must be at least 0"),
            (self.save_every >= 0, "--save-every must be at least 0 (0: only at the end)"),
            (self.precision in ("fp32", "bf16", "fp16"), f"unknown --precision {self.precision!r}"),
            (self.distributed in ("ddp", "fsdp"), f"unknown --distributed {self.distributed!r}"),
            (self.base_quant in ("none", "nf4", "int8"), f"unknown --base-quant {self.base_quant!r}"),
            (self.save_format in ("hf", "native"), f"unknown --save-format {self.save_format!r}"),
            (
                not (self.full and self.base_quant != "none"),
                f"--base-quant {self.base_quant} with --full: a quantized base is frozen (it trains LoRA over it); "
                "--full trains the weights themselves, so choose one",
            ),
            (self.full or self.train_modules == "all", "--train-modules applies to --full only"),
            (not self.base_quant_embed or self.base_quant != "none", "--base-quant-embed needs --base-quant"),
            (not (self.full and self.dora), "--dora is a LoRA variant; --full trains no adapter"),
            (
                1 <= self.dist_timeout <= MAX_DIST_TIMEOUT,
                f"--dist-timeout must be between 1 and {MAX_DIST_TIMEOUT} seconds",
            ),
        ]
        for ok, message in checks:
            if not ok:
                raise GemmaError(message)
        if self.full:
            from train.full import parse_modules

            parse_modules(self.train_modules)
        if self.chat_prompt is not None and has_lone_surrogate(self.chat_prompt):
            raise GemmaError("--chat-prompt is not valid text (bytes that are not UTF-8, or a lone surrogate)")
        bad = [t for t in self.targets if t not in ALL_TARGETS]
        if bad or not self.targets:
            raise GemmaError(f"--lora-targets: unknown target {bad[0]!r}" if bad else "--lora-targets is empty")

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    @property
    def source(self) -> str:
        return self.model or self.size or "3-270m"

    @property
    def base_name(self) -> str:
        """The base model as an adapter names it (peft's base_model_name_or_path): a preset by its hub repo id
        (`google/gemma-3-270m`, which peft and transformers can find, not `3-270m`), a local folder or file by its
        absolute path, a repo id as given."""
        from gemma.model.config import PRESETS, preset

        source = self.source
        if source in PRESETS and not Path(source).exists():
            return preset(source).hf_repo
        path = Path(source).expanduser()
        return str(path.resolve()) if path.exists() else source

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


class _Parser(argparse.ArgumentParser):
    """argparse's mistakes (an unknown flag, `--lr abc`) as one `error:` line, not usage text and a second line."""

    def error(self, message: str):
        raise GemmaError(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m train.sft",
        description="LoRA supervised fine-tuning of Gemma.",
        argument_default=argparse.SUPPRESS,
    )
    for f in dataclasses.fields(TrainOptions):
        help_text, kw = f.metadata["help"], {k: v for k, v in f.metadata.items() if k != "help"}
        if f.type in ("bool", bool):
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, help=help_text)
            continue
        if str(f.type) == "list[str]":
            parser.add_argument(_flag(f.name), action="append", help=f"{help_text} (repeatable)", **kw)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(str(f.type), str)
        parser.add_argument(_flag(f.name), type=kind, help=f"{help_text} (default: {f.default})", **kw)
    return parser


def _read_config_file(path: str) -> dict[str, Any]:
    p = Path(path)
    raw = read_bytes(p, "config file")  # a FIFO or /dev/zero is refused, not read forever
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise GemmaError(f"{path}: not UTF-8 text") from None
    if p.suffix.lower() in (".yaml", ".yml"):
        import yaml

        try:
            data = yaml.safe_load(text)
        except Exception as exc:  # yaml raises its own error types, and RecursionError when nested too deeply
            message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise GemmaError(f"{path}: not valid YAML ({message})") from None
    else:
        data = loads_strict(text, path)
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
    if base == "list[str]":
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, str | int | float) and not isinstance(v, bool) for v in items):
            raise GemmaError(f"{where} must be a string or a list of strings, got {value!r}")
        return [str(v) for v in items]
    try:
        if base == "bool":
            if isinstance(value, bool):
                return value
            raise ValueError
        if base == "int":
            if isinstance(value, int) and not isinstance(value, bool):
                return value  # exactly, however large (the checks in __post_init__ bound it)
            if isinstance(value, bool) or float(value) != int(float(value)):  # "1e400": OverflowError
                raise ValueError
            return int(float(value))
        if base == "float":
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError, OverflowError):
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
