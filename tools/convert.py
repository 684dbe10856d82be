"""Convert a Gemma model between formats.

    python tools/convert.py SRC DST --to native|hf [--adapter DIR] [--dtype fp32|bf16|fp16] [--force]

SRC is any model source: an HF folder, a native folder, a .gguf file, an HF repo id or a preset name. DST is
written under a temporary name and renamed into place; an existing DST is kept unless --force, and is never SRC,
a folder holding SRC, or a file of it. With --adapter (a PEFT adapter folder) the LoRA weights are merged into the
output, which holds no LoRA tensors.
"""

from __future__ import annotations

import argparse
import sys
import time

from gemma.cli import DTYPES, main_guard, parse_dtype


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="HF folder, native folder, .gguf file, HF repo id or preset name")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", required=True, choices=("native", "hf"), help="output format")
    parser.add_argument(
        "--dtype", choices=DTYPES, default=None, help="output dtype (default: as stored; float32 for a GGUF source)"
    )
    parser.add_argument(
        "--adapter", metavar="DIR", default=None, help="a PEFT LoRA adapter folder to merge into the output"
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)

    from gemma.formats.convert import convert

    start = time.perf_counter()
    dtype = parse_dtype(args.dtype) if args.dtype else None
    dst = convert(args.src, args.dst, args.to, dtype=dtype, force=args.force, adapter=args.adapter)
    print(f"wrote {dst} ({args.to}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
