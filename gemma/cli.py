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
