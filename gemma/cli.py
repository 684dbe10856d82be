"""Shared plumbing for command-line entry points: user errors become `error: ...` and exit status 2."""

from __future__ import annotations

import functools
import sys
from typing import Callable

from gemma.errors import GemmaError

DTYPES = ("fp32", "bf16", "fp16")


def parse_dtype(name: str):
    """`fp32|bf16|fp16` -> torch dtype (a GemmaError for anything else)."""
    import torch

    table = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    if name not in table:
        raise GemmaError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return table[name]


def add_model_args(parser) -> None:
    """The model flags every tool shares: --model, --size, --adapter, --dtype, --device, --quantize."""
    parser.add_argument("--model", default="3-270m",
                        help="HF folder, native folder, .gguf file, HF repo id or preset name (default: 3-270m)")
    parser.add_argument("--size", metavar="NAME", default=None, help="a preset name, instead of --model")
    parser.add_argument("--adapter", metavar="DIR", default=None, help="a PEFT LoRA adapter folder to apply")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--quantize", choices=("int8",), default=None,
                        help="store the weights in int8 (per-row scales; activations stay in --dtype): half the "
                             "bytes read per token, faster decoding on CPU, slightly different outputs")


def precision_label(args) -> str:
    """'bf16', or 'bf16, int8 weights' with --quantize int8: how a tool reports what it loaded."""
    return f"{args.dtype}, {args.quantize} weights" if args.quantize else args.dtype


def main_guard(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a `main()` so that a GemmaError prints one `error:` line and exits 2, with no traceback."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except GemmaError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except FileNotFoundError as exc:
            print(f"error: {exc.filename or exc}: no such file or directory", file=sys.stderr)
            return 2

    return wrapper
