"""Convert a Gemma model between formats.

    python tools/convert.py SRC DST --to native|hf [--adapter DIR] [--dtype fp32|bf16|fp16] [--force]
    python tools/convert.py SRC DST.gguf --to gguf [--dtype bf16|f16|f32|q8_0|q4_0] [--modelfile] [--adapter DIR]

SRC is any model source: an HF folder, a native folder, a .gguf file, an HF repo id or a preset name. DST is
written under a temporary name and renamed into place; an existing DST is kept unless --force, and is never SRC,
a folder holding SRC, or a file of it. With --adapter (a PEFT adapter folder) the LoRA weights are merged into the
output, which holds no LoRA tensors.

--to gguf writes one file for llama.cpp, Ollama and LM Studio (Gemma 1, 2, 3 and 4), with the chat template in its
metadata; --dtype picks the type of its matrices (default bf16; the norms stay f32). --modelfile writes an Ollama
Modelfile beside it (DST.Modelfile): `ollama create NAME -f DST.Modelfile`. For the K-quants (Q4_K_M, ...), write
bf16 and run llama.cpp's llama-quantize on it.
"""

from __future__ import annotations

import argparse
import sys
import time

from gemma.cli import DTYPES, main_guard, parse_dtype
from gemma.formats.gguf_write import GGUF_DTYPES


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="tools/convert.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("src", help="HF folder, native folder, .gguf file, HF repo id or preset name")
    parser.add_argument("dst", help="output folder")
    parser.add_argument("--to", required=True, choices=("native", "hf", "gguf"), help="output format")
    parser.add_argument(
        "--dtype",
        default=None,
        help=f"output dtype: {'|'.join(DTYPES)} for native and hf (default: as stored; float32 for a GGUF source), "
        f"{'|'.join(GGUF_DTYPES)} for gguf (default bf16)",
    )
    parser.add_argument("--modelfile", action="store_true", help="with --to gguf: write an Ollama Modelfile beside")
    parser.add_argument(
        "--adapter", metavar="DIR", default=None, help="a PEFT LoRA adapter folder to merge into the output"
    )
    parser.add_argument("--force", action="store_true", help="replace DST if it exists")
    args = parser.parse_args(argv)

    from gemma.formats.convert import convert

    start = time.perf_counter()
    if args.to == "gguf":
        dtype, gguf_dtype = None, args.dtype or "bf16"
    else:
        dtype, gguf_dtype = (parse_dtype(args.dtype) if args.dtype else None), "bf16"
    dst = convert(
        args.src,
        args.dst,
        args.to,
        dtype=dtype,
        force=args.force,
        adapter=args.adapter,
        gguf_dtype=gguf_dtype,
        modelfile=args.modelfile,
    )
    print(f"wrote {dst} ({args.to}) in {time.perf_counter() - start:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
