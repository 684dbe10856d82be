"""Score a model on a held-out data file: ROUGE-1/2/L, BLEU-4, exact match, and the loss and perplexity of the
reference answers.

    python tools/evaluate.py --model SRC [--adapter DIR] --data FILE --out FILE.json [--max-new-tokens N] ...

The data file is JSON or JSONL in any training shape (alpaca, sharegpt, messages). For each record the model answers
the conversation up to its last model turn (greedy, batched: requests share forward passes as they do in
tools/serve.py), and that turn is the reference. Records without a model turn are skipped (and counted). The loss
is taken on every model turn of each record, encoded as training encodes it, so it is the eval loss that training
reports for the same file and --max-len. See train/metrics.py for how text is tokenised (Chinese by characters,
other text by words) and how each score is defined, and train/evaluate.py for the scoring itself.

Writes the summary JSON at --out and one JSON line per record (prompt, reference, prediction, scores) beside it, at
FILE.predictions.jsonl (or --predictions), both atomically; scores that are not finite numbers are written as null.
Both outputs are tried before anything is loaded, and neither may replace an input. The summary is also printed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gemma.cli import add_model_args, load_model, main_guard
from gemma.errors import GemmaError
from gemma.files import check_source_file, refuse_overwriting_inputs, regular_file
from gemma.writing import check_writable


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/evaluate.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_args(p)
    p.add_argument("--data", metavar="FILE", required=True, help="JSON or JSONL records (alpaca, sharegpt, messages)")
    p.add_argument("--out", metavar="FILE.json", required=True, help="where the summary goes")
    p.add_argument(
        "--predictions",
        metavar="FILE",
        default=None,
        help="where the per-record lines go (default: beside --out, as NAME.predictions.jsonl)",
    )
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="answers generated together (default 8)")
    p.add_argument(
        "--max-len",
        type=int,
        default=None,
        help="tokens a record may span (default: the model's context, at most 8192); longer prompts are "
        "an error, longer records are truncated for the loss as in training",
    )
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    return p


def check_flags(args) -> tuple[Path, Path]:
    """(the summary's path, the predictions' path), once the numbers are in range and both outputs are known to
    be writable and to spare every input: nothing is read or loaded before that."""
    for name, low in (("max_new_tokens", 1), ("batch_size", 1), ("max_len", 2), ("limit", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise GemmaError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    from train.evaluate import predictions_path

    out = Path(args.out)
    preds_path = Path(args.predictions) if args.predictions else predictions_path(out)
    if out.resolve() == preds_path.resolve():
        raise GemmaError(f"{out}: the summary and the predictions cannot be the same file")
    refuse_overwriting_inputs(
        {"--out": out, "--predictions": preds_path},
        {"--data": args.data, "--model": args.size or args.model, "--adapter": args.adapter},
    )
    check_writable(out, "--out")
    check_writable(preds_path, "--predictions")
    return out, preds_path


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out, preds_path = check_flags(args)

    from train import evaluate
    from train.metrics import check_scoring_available

    check_scoring_available()
    if not Path(args.data).is_dir():
        regular_file(args.data, "data file")  # a FIFO or /dev/zero would never end
    check_source_file(args.size or args.model)
    cases, skipped = evaluate.read_cases(args.data, args.limit)  # a malformed file fails before the (slow) load

    model, tokenizer, loaded = load_model(args)
    print(f"[{loaded}; {len(cases)} records to score]", file=sys.stderr)
    scored = evaluate.score_cases(
        model,
        tokenizer,
        cases,
        context=min(model.config.max_seq_len, args.max_len or 8192),
        max_new_tokens=args.max_new_tokens,
        batch_size=args.batch_size,
    )
    run = {"model": args.size or args.model, "adapter": args.adapter, "dtype": args.dtype, "data": args.data}
    summary = evaluate.summary(run, scored, skipped, args.max_new_tokens, preds_path)
    evaluate.write_outputs(out, preds_path, summary, evaluate.prediction_lines(cases, scored))

    print(f"records {len(cases)} scored ({skipped} without an answer skipped)")
    for key in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "loss", "perplexity"):
        value = summary[key]
        print(f"{key:<12} {value:.4f}" if value is not None else f"{key:<12} n/a")
    print(f"[wrote {out} and {preds_path}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
