"""Score a model on a held-out data file: ROUGE-1/2/L, BLEU-4, exact match, and the loss and perplexity of the
reference answers.

    python tools/evaluate.py --model SRC [--adapter DIR] --data FILE --out FILE.json [--max-new-tokens N] ...

The data file is JSON or JSONL in any training shape (alpaca, sharegpt, messages). For each record the model answers
the conversation up to its last model turn (greedy, batched: requests share forward passes as they do in
tools/serve.py), and that turn is the reference. Records without a model turn are skipped (and counted). The loss
is taken on every model turn of each record, encoded as training encodes it, so it is the eval loss that training
reports for the same file and --max-len. See train/metrics.py for how text is tokenised (Chinese by characters,
other text by words) and how each score is defined.

Writes the summary JSON at --out and one JSON line per record (prompt, reference, prediction, scores) beside it, at
FILE.predictions.jsonl (or --predictions), both atomically; scores that are not finite numbers are written as null.
Both outputs are tried before anything is loaded, and neither may replace an input. The summary is also printed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from gemma.cli import add_model_args, load_model, main_guard
from gemma.errors import GemmaError
from gemma.files import check_source_file, refuse_overwriting_inputs, regular_file
from gemma.writing import check_writable, finite_json, write_files_atomically


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tools/evaluate.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--data", metavar="FILE", required=True, help="JSON or JSONL records (alpaca, sharegpt, messages)")
    p.add_argument("--out", metavar="FILE.json", required=True, help="where the summary goes")
    p.add_argument("--predictions", metavar="FILE", default=None,
                   help="where the per-record lines go (default: beside --out, as NAME.predictions.jsonl)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="answer length limit (default 256)")
    p.add_argument("--batch-size", type=int, default=8, help="answers generated together (default 8)")
    p.add_argument("--max-len", type=int, default=None,
                   help="tokens a record may span (default: the model's context, at most 8192); longer prompts are "
                        "an error, longer records are truncated for the loss as in training")
    p.add_argument("--limit", type=int, default=None, help="score only the first N records")
    return p


def predictions_path(out: Path) -> Path:
    stem = out.name[:-len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(f"{stem}.predictions.jsonl")


def read_cases(path: str, limit: int | None) -> tuple[list[dict], int]:
    """The records to score, each {"where", "messages" (up to the last model turn), "prompt" (before it),
    "reference"}, and the number of records skipped for having no model turn."""
    from train.data import _read_located, record_messages
    from train.report import split_prompt

    located = _read_located(path)
    if limit is not None:
        located = located[:limit]
    cases, skipped = [], 0
    for where, record in located:
        messages = record_messages(record, where)
        split = split_prompt(messages)
        if split is None:
            skipped += 1
            continue
        prompt, reference = split
        cases.append({"where": where, "messages": messages[:len(prompt) + 1], "prompt": prompt,
                      "reference": reference})
    if not cases:
        raise GemmaError(f"{path}: no record has a model turn to score against")
    return cases, skipped


def reply_text(tokenizer, ids) -> str:
    """The reply as text: no special token, no surrounding whitespace."""
    special = {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id, tokenizer.start_of_turn_id,
               tokenizer.end_of_turn_id}
    return tokenizer.decode([i for i in ids if i not in special]).strip()


@main_guard
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name, low in (("max_new_tokens", 1), ("batch_size", 1), ("max_len", 2), ("limit", 1)):
        value = getattr(args, name)
        if value is not None and value < low:
            raise GemmaError(f"--{name.replace('_', '-')} must be at least {low}, got {value}")
    out = Path(args.out)
    preds_path = Path(args.predictions) if args.predictions else predictions_path(out)
    if out.resolve() == preds_path.resolve():
        raise GemmaError(f"{out}: the summary and the predictions cannot be the same file")
    # Nothing is read or loaded before the outputs are known to be writable and to spare every input.
    refuse_overwriting_inputs({"--out": out, "--predictions": preds_path},
                              {"--data": args.data, "--model": args.size or args.model, "--adapter": args.adapter})
    check_writable(out, "--out")
    check_writable(preds_path, "--predictions")

    from train.metrics import check_scoring_available

    check_scoring_available()
    if not Path(args.data).is_dir():
        regular_file(args.data, "data file")  # a FIFO or /dev/zero would never end
    check_source_file(args.size or args.model)
    cases, skipped = read_cases(args.data, args.limit)  # a malformed file fails before the (slow) model load

    from tqdm import tqdm

    from gemma.engine import Engine
    from train.data import encode_messages
    from train.metrics import mean_loss, perplexity, reference_losses, text_scores

    source = args.size or args.model
    model, tokenizer, loaded = load_model(args)
    print(f"[{loaded}; {len(cases)} records to score]", file=sys.stderr)
    context = min(model.config.max_seq_len, args.max_len or 8192)

    prompts = []
    for case in cases:
        ids = tokenizer.apply_chat(case["prompt"])
        if len(ids) >= context:
            raise GemmaError(f"{case['where']}: the prompt ({len(ids)} tokens) does not fit the context of {context} "
                             "tokens (see --max-len)")
        prompts.append(ids)

    started = time.perf_counter()
    with Engine(model, tokenizer, max_batch=args.batch_size, max_len=context) as engine, \
            tqdm(total=len(prompts), desc="generating", unit="record", file=sys.stderr) as bar:
        finishes = engine.run_all(prompts, on_finish=lambda i, f: bar.update(1),
                                  max_new_tokens=args.max_new_tokens, temperature=0.0)
    for case, finish in zip(cases, finishes):
        if finish.reason == "error":
            raise RuntimeError(f"{case['where']}: generation failed: {finish.error}")
    generate_s = time.perf_counter() - started
    predictions = [reply_text(tokenizer, f.token_ids) for f in finishes]
    references = [case["reference"].strip() for case in cases]

    examples, truncated = [], 0
    for case in cases:
        example, cut = encode_messages(case["messages"], tokenizer, context)
        examples.append(example)
        truncated += cut
    kept = [e for e in examples if e is not None]
    with tqdm(total=len(kept), desc="loss", unit="record", file=sys.stderr) as bar:
        losses = iter(reference_losses(model, kept, tokenizer.pad_id, args.batch_size, bar.update))
    per_record = [next(losses) if e is not None else None for e in examples]
    loss, loss_tokens = mean_loss([x for x in per_record if x is not None])

    scores, rows = text_scores(predictions, references)
    lines = []
    for i, (case, finish, prediction, row, lr) in enumerate(zip(cases, finishes, predictions, rows, per_record)):
        lines.append(json.dumps(finite_json({
            "index": i, "where": case["where"], "prompt": case["prompt"][-1]["content"],
            "reference": references[i], "prediction": prediction, "finish_reason": finish.reason,
            "exact_match": row.exact_match, "rouge1": row.rouge1, "rouge2": row.rouge2, "rougeL": row.rougeL,
            "bleu": row.bleu, "loss": (lr[0] / lr[1]) if lr and lr[1] else None, "loss_tokens": lr[1] if lr else 0,
        }), ensure_ascii=False, allow_nan=False))
    summary = {
        "model": source, "adapter": args.adapter, "dtype": args.dtype, "data": args.data,
        "records": len(cases) + skipped, "scored": len(cases), "skipped_no_answer": skipped,
        "max_new_tokens": args.max_new_tokens,
        **scores,
        "loss": loss, "perplexity": perplexity(loss) if loss is not None else None, "loss_tokens": loss_tokens,
        "loss_records": len(kept), "loss_truncated": truncated,
        "generated_tokens": sum(f.completion_tokens for f in finishes), "generate_seconds": round(generate_s, 3),
        "tokenization": "Chinese characters one by one; other text by words and punctuation marks",
        "predictions": str(preds_path),
    }
    write_files_atomically({
        preds_path: "".join(line + "\n" for line in lines),
        out: json.dumps(finite_json(summary), ensure_ascii=False, indent=2, allow_nan=False) + "\n"})

    print(f"records {len(cases)} scored ({skipped} without an answer skipped)")
    for key in ("exact_match", "rouge1", "rouge2", "rougeL", "bleu", "loss", "perplexity"):
        value = summary[key]
        print(f"{key:<12} {value:.4f}" if value is not None else f"{key:<12} n/a")
    print(f"[wrote {out} and {preds_path}]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
