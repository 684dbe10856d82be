"""`python -m gemma SRC`: load a model from any source and print what it is (a quick check that a checkpoint
is sound: every tensor present, every shape right, every weight finite, the tokenizer readable)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from gemma.cli import main_guard, parse_dtype
from gemma.errors import GemmaError

_CHUNK = 1 << 24  # values checked at a time, so that the check never holds a second copy of a large tensor


def first_non_finite(state) -> str | None:
    """The name of the first tensor (in `state`'s order) holding a NaN or an infinity, or None."""
    import torch

    for name, tensor in state.items():
        flat = tensor.reshape(-1)
        if any(not torch.isfinite(flat[i : i + _CHUNK]).all() for i in range(0, flat.numel(), _CHUNK)):
            return name
    return None


def file_names(path, cfg) -> dict[str, str]:
    """native name -> the tensor's name in the source's files, for messages."""
    from gemma.formats.checkpoint import hf_names
    from gemma.formats.load import folder_kind

    if not path.is_dir():
        from gemma.formats.gguf import gguf_names

        return gguf_names(cfg)
    return {} if folder_kind(path) == "native" else hf_names(cfg)


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma", description=__doc__)
    parser.add_argument("source", help="HF folder, native folder, .gguf file, HF repo id or preset name")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    args = parser.parse_args(argv)

    from gemma.formats.load import load_weights, resolve

    dtype = parse_dtype(args.dtype)
    path = resolve(args.source)
    cfg, state, tokenizer = load_weights(path, dtype)
    bad = first_non_finite(state)
    if bad is not None:
        # In fp16 a finite weight beyond its range (65504) becomes infinite: say which precision was checked.
        read_as = "" if args.dtype == "fp32" else f" (read as {args.dtype})"
        raise GemmaError(
            f"{path}: tensor {file_names(path, cfg).get(bad, bad)!r} holds NaN or infinite values{read_as}"
        )
    summary = {
        "parameters": sum(t.numel() for t in state.values()),
        "tokenizer_vocab": tokenizer.vocab_size,
        "config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "layer_types"},
        "layer_types": "".join("L" if t == "sliding" else "G" for t in cfg.layer_types),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
