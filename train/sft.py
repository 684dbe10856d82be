"""`python -m train.sft`: LoRA supervised fine-tuning of Gemma.

With no flags at all it runs the project's main job: a LoRA SFT of the embedded default model (the real
Gemma 3 270M) on the sample data in examples/, scoring the held-out set before and after, then answering one
prompt with the tuned model.
"""

from __future__ import annotations

import json
import sys
import time

from gemma.cli import main_guard
from gemma.errors import GemmaError
from train.options import EXAMPLES, parse_options

# The main job's settings when the user gives no data of their own.
DEMO = {
    "eval_data": str(EXAMPLES / "arith_eval.jsonl"),
    "eval_generate": 60,
    "chat_prompt": "小明有13个苹果，又买了9个，现在一共有多少个苹果？",
}


@main_guard
def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    opts = parse_options(argv)
    if not any(a.split("=")[0] in ("--data", "--config") for a in argv):
        for key, value in DEMO.items():
            if getattr(opts, key) in (None, 0, 0.0):
                setattr(opts, key, value)

    from train import distributed
    from train.loop import Interrupted, train

    start = time.perf_counter()
    try:
        # Progress goes to stdout; stderr carries the progress bar and, on a user's mistake, one error line.
        run_dir = train(opts, log=lambda m: print(m, flush=True))
    except Interrupted as stop:
        return 128 + stop.signum
    except GemmaError as exc:  # under torchrun, rank 0 reports what every process hit
        mine = distributed.error_to_report(exc)
        if mine is None:
            return 2
        raise mine from None
    if distributed.env_rank() != 0:
        return 0
    what = "model" if opts.full else "adapter"
    print(f"done in {time.perf_counter() - start:.0f}s: {what} in {run_dir / what}", flush=True)
    report = run_dir / "report.json"
    if report.exists():
        print(json.dumps(json.loads(report.read_text()), ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
