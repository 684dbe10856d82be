"""`python -m gemma SRC`: load a model from any source and print what it is (a quick check that a checkpoint
is sound: every tensor present, every shape right, the tokenizer readable)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from gemma.cli import main_guard, parse_dtype


@main_guard
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gemma", description=__doc__)
    parser.add_argument("source", help="HF folder, native folder, .gguf file, HF repo id or preset name")
    parser.add_argument("--dtype", default="fp32", help="fp32 | bf16 | fp16 (default fp32)")
    args = parser.parse_args(argv)

    from gemma.load import load_weights

    cfg, state, tokenizer = load_weights(args.source, parse_dtype(args.dtype))
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
