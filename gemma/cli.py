"""Shared plumbing for command-line entry points: user errors become `error: ...` and exit status 2."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
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
    """The model flags every tool shares: --model, --size, --adapter, --dtype, --device, --quantize, --compile."""
    parser.add_argument(
        "--model",
        default="3-270m",
        help="HF folder, native folder, .gguf file, HF repo id or preset name (default: 3-270m)",
    )
    parser.add_argument("--size", metavar="NAME", default=None, help="a preset name, instead of --model")
    parser.add_argument("--adapter", metavar="DIR", default=None, help="a PEFT LoRA adapter folder to apply")
    parser.add_argument("--dtype", choices=DTYPES, default="bf16", help="compute dtype (default bf16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--quantize",
        choices=("int8", "int4", "nf4"),
        default=None,
        help="store the weights in int8 (per-row scales; activations stay in --dtype): half the "
        "bytes read per token, faster decoding on CPU, slightly different outputs; int4 (a scale and zero "
        "per 32 weights): a quarter of the bytes, the fastest CPU decoding, outputs further from the float "
        "model's; or nf4 (QLoRA's 4-bit format for the projections, an adapter kept unmerged over them): "
        "little memory, slower",
    )
    parser.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile each decoding step whole (about 1.5x faster decoding on CPU) and the elementwise "
        "work of prompt processing, after a one-time compile (10-30 s, cached on disk); outputs equal up to "
        "float32 rounding",
    )


def pick_device(name: str | None):
    """The torch device a `--device` value names (default: cuda when there is one, else cpu), checked now: an
    unknown name, or a device this machine does not have, is a GemmaError naming the flag."""
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise GemmaError(f"--device {name}: not a device (cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise GemmaError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise GemmaError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise GemmaError(f"--device {name}: MPS is not available on this machine")
    elif device.type != "cpu":
        raise GemmaError(f"--device {name}: unsupported device type {device.type!r} (cpu, cuda, mps)")
    return device


def load_model(args):
    """(model, tokenizer, what) for the flags of `add_model_args`: the model in eval mode on --device (default
    cuda when there is one), and `what` as the tools report it: 'loaded SOURCE (bf16, cpu) in 1.2s'."""
    import time

    import gemma

    device = str(pick_device(args.device))
    source = args.size or args.model
    start = time.perf_counter()
    model, tokenizer = gemma.load(
        source,
        adapter=args.adapter,
        dtype=parse_dtype(args.dtype),
        device=device,
        quantize=args.quantize,
        compile=args.compile,
    )
    model.eval()
    seconds = time.perf_counter() - start
    if tokenizer.template_note:
        print(f"note: {tokenizer.template_note}", file=sys.stderr)
    return model, tokenizer, f"loaded {source} ({precision_label(args)}, {device}) in {seconds:.1f}s"


def precision_label(args) -> str:
    """'bf16', or 'bf16, int8 weights' with --quantize int8 (', compiled' with --compile): how a tool reports what
    it loaded."""
    label = f"{args.dtype}, {args.quantize} weights" if args.quantize else args.dtype
    return label + (", compiled" if args.compile else "")


def keep_freed_memory() -> bool:
    """Let glibc keep freed memory for reuse instead of handing it back to the system at once.

    A forward pass frees and allocates the same activations layer after layer (a 512-token prompt: 1-2 MB each).
    glibc serves blocks that size by mmap, or trims them off its heap when freed, so every layer page-faults its
    memory in again: measured on this project's 2-core CPU, a third of a 512-token prefill in a fresh process.
    Fixed thresholds (mmap from 32 MB, trim beyond 512 MB free) keep them in the heap. Process-wide, so only the
    command-line entry points call it (through `main_guard`); False where mallopt is not glibc's."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # another C library (musl has no mallopt)
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(mallopt(m_mmap_threshold, 32 << 20)) and bool(mallopt(m_trim_threshold, 512 << 20))


# OSErrors that come from the user's environment rather than from a bug: a full disk, a read-only or unwritable
# output, a path that is not what the command needs. `main_guard` reports them as one line.
USER_OS_ERRORS = {
    errno.ENOSPC,
    errno.EDQUOT,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.ENOENT,
    errno.EISDIR,
    errno.ENOTDIR,
    errno.EEXIST,
    errno.ENAMETOOLONG,
    errno.EFBIG,
    errno.ELOOP,
    errno.ENXIO,
    errno.ENOTEMPTY,
    errno.EXDEV,
    errno.EMFILE,
}


def os_error_line(exc: OSError) -> str:
    """'PATH: no space left on device' (the path once, the reason in words)."""
    reason = (exc.strerror or str(exc)).lower()
    where = exc.filename if exc.filename is not None else None
    return f"{where}: {reason}" if where is not None else reason


def _safe_streams() -> None:
    """Text that the terminal's encoding cannot show (Chinese on a C locale) is escaped instead of raising
    UnicodeEncodeError after the work is done."""
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            try:
                reconfigure(errors="backslashreplace")
            except (ValueError, OSError):  # a detached or closed stream
                pass


def _end_progress_bars() -> None:
    """Close live tqdm bars, so that an error line starts a line of its own instead of being glued to a bar."""
    tqdm_module = sys.modules.get("tqdm")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # noqa: BLE001 - a bar that cannot close must not hide the error
            pass


def print_error(message: str) -> None:
    _end_progress_bars()
    print(f"error: {message}", file=sys.stderr, flush=True)


def main_guard(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a `main()` so that a GemmaError (or an OSError from the environment: a full disk, a read-only output)
    prints one `error:` line and exits 2, and Ctrl-C that the tool does not handle itself exits 130, with no
    traceback (and freed memory is kept for reuse: `keep_freed_memory`)."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        keep_freed_memory()
        _safe_streams()
        try:
            return main(*args, **kwargs) or 0
        except GemmaError as exc:
            print_error(str(exc))
            return 2
        except OSError as exc:
            if exc.errno not in USER_OS_ERRORS:
                raise
            print_error(GemmaError(os_error_line(exc)).args[0])
            return 2
        except KeyboardInterrupt:  # e.g. during a long model load
            return 130

    return wrapper
