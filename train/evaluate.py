"""Scoring a model's answers on held-out records: what tools/evaluate.py runs, and where the training report
(train/report.py) takes its split of a record into prompt and reference.

A record's case is its conversation up to the last model turn: the turns before it are the prompt, that turn's text
the reference (`split_prompt`, `read_cases`). The model answers every prompt greedily through gemma.generation.engine
(`generate_answers`); each answer is scored against its reference by train.metrics (ROUGE-1/2/L, BLEU-4, exact
match), and the loss of the references is taken as training takes it (`reference_loss`). `score_cases` does all
of it; `prediction_lines` and `summary` are what the command writes, with `write_outputs`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from gemma.errors import GemmaError
from gemma.writing import finite_json, write_files_atomically
from train import metrics

TOKENIZATION = "Chinese characters one by one; other text by words and punctuation marks"


# ---- cases ---------------------------------------------------------------------------------------------------------


def split_prompt(messages: list[dict]) -> tuple[list[dict], str] | None:
    """(the conversation up to the last model turn, that turn's text), or None without a model turn."""
    for i in range(len(messages) - 1, -1, -1):
        if messages[i]["role"] in ("model", "assistant"):
            return messages[:i], messages[i]["content"]
    return None


def read_cases(path: str, limit: int | None) -> tuple[list[dict], int]:
    """The records to score, each {"where", "messages" (up to the last model turn), "prompt" (before it),
    "reference"}, and the number of records skipped for having no model turn."""
    from train.data import _read_located, record_messages

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
        cases.append(
            {"where": where, "messages": messages[: len(prompt) + 1], "prompt": prompt, "reference": reference}
        )
    if not cases:
        raise GemmaError(f"{path}: no record has a model turn to score against")
    return cases, skipped


# ---- answers and the reference loss --------------------------------------------------------------------------------


def reply_text(tokenizer, ids) -> str:
    """The reply as text: no special token, no surrounding whitespace."""
    special = {
        tokenizer.bos_id,
        tokenizer.eos_id,
        tokenizer.pad_id,
        tokenizer.start_of_turn_id,
        tokenizer.end_of_turn_id,
    }
    return tokenizer.decode([i for i in ids if i not in special]).strip()


def generate_answers(model, tokenizer, cases: list[dict], context: int, max_new_tokens: int, batch_size: int):
    """(the engine's Finish of each case's greedy answer, seconds spent generating). A prompt that does not fit
    `context` is a GemmaError naming its record."""
    from tqdm import tqdm

    from gemma.generation.engine import Engine

    prompts = []
    for case in cases:
        ids = tokenizer.apply_chat(case["prompt"])
        if len(ids) >= context:
            raise GemmaError(
                f"{case['where']}: the prompt ({len(ids)} tokens) does not fit the context of {context} "
                "tokens (see --max-len)"
            )
        prompts.append(ids)

    started = time.perf_counter()
    with (
        Engine(model, tokenizer, max_batch=batch_size, max_len=context) as engine,
        tqdm(total=len(prompts), desc="generating", unit="record", file=sys.stderr) as bar,
    ):
        finishes = engine.run_all(
            prompts, on_finish=lambda i, f: bar.update(1), max_new_tokens=max_new_tokens, temperature=0.0
        )
    for case, finish in zip(cases, finishes):
        if finish.reason == "error":
            raise RuntimeError(f"{case['where']}: generation failed: {finish.error}")
    return finishes, time.perf_counter() - started


def reference_loss(
    model, tokenizer, cases: list[dict], context: int, batch_size: int
) -> tuple[list[tuple[float, int] | None], int]:
    """(each case's (summed cross-entropy, target tokens) on its model turns, encoded as training encodes them, or
    None for a case that leaves no target token; the number of cases truncated to `context`)."""
    from tqdm import tqdm

    from train.data import encode_messages

    examples, truncated = [], 0
    for case in cases:
        example, cut = encode_messages(case["messages"], tokenizer, context)
        examples.append(example)
        truncated += cut
    kept = [e for e in examples if e is not None]
    with tqdm(total=len(kept), desc="loss", unit="record", file=sys.stderr) as bar:
        losses = iter(metrics.reference_losses(model, kept, tokenizer.pad_id, batch_size, bar.update))
    return [next(losses) if e is not None else None for e in examples], truncated


# ---- scoring -------------------------------------------------------------------------------------------------------


@dataclass
class Scored:
    """What `score_cases` found, case by case and over all of them."""

    finishes: list  # gemma.generation.engine.Finish of each answer
    predictions: list[str]  # the answers as text (`reply_text`)
    references: list[str]  # stripped
    rows: list[metrics.RecordScores]
    scores: dict  # metrics.text_scores' summary: exact_match, rouge1, rouge2, rougeL, bleu
    losses: list[tuple[float, int] | None]  # per case, as `reference_loss`
    truncated: int
    generate_seconds: float

    @property
    def loss(self) -> tuple[float | None, int]:
        """(loss per target token over all cases, target tokens)."""
        return metrics.mean_loss([x for x in self.losses if x is not None])


def score_cases(model, tokenizer, cases: list[dict], *, context: int, max_new_tokens: int, batch_size: int) -> Scored:
    """Answer every case greedily, score the answers against the references, and take the references' loss."""
    finishes, seconds = generate_answers(model, tokenizer, cases, context, max_new_tokens, batch_size)
    predictions = [reply_text(tokenizer, f.token_ids) for f in finishes]
    references = [case["reference"].strip() for case in cases]
    losses, truncated = reference_loss(model, tokenizer, cases, context, batch_size)
    scores, rows = metrics.text_scores(predictions, references)
    return Scored(finishes, predictions, references, rows, scores, losses, truncated, seconds)


# ---- outputs -------------------------------------------------------------------------------------------------------


def predictions_path(out: Path) -> Path:
    """Where the per-record lines go by default: beside the summary, NAME.predictions.jsonl."""
    stem = out.name[: -len(".json")] if out.name.endswith(".json") else out.name
    return out.with_name(f"{stem}.predictions.jsonl")


def prediction_lines(cases: list[dict], scored: Scored) -> list[str]:
    """One JSON line per case: where it is, its prompt, reference, prediction and scores (null for non-finite)."""
    lines = []
    for i, (case, finish, row, lr) in enumerate(zip(cases, scored.finishes, scored.rows, scored.losses)):
        lines.append(
            json.dumps(
                finite_json(
                    {
                        "index": i,
                        "where": case["where"],
                        "prompt": case["prompt"][-1]["content"],
                        "reference": scored.references[i],
                        "prediction": scored.predictions[i],
                        "finish_reason": finish.reason,
                        "exact_match": row.exact_match,
                        "rouge1": row.rouge1,
                        "rouge2": row.rouge2,
                        "rougeL": row.rougeL,
                        "bleu": row.bleu,
                        "loss": (lr[0] / lr[1]) if lr and lr[1] else None,
                        "loss_tokens": lr[1] if lr else 0,
                    }
                ),
                ensure_ascii=False,
                allow_nan=False,
            )
        )
    return lines


def summary(run: dict, scored: Scored, skipped: int, max_new_tokens: int, predictions: Path) -> dict:
    """The summary of a scoring: `run` (what was scored: model, adapter, dtype, data) and what came out."""
    loss, loss_tokens = scored.loss
    return {
        **run,
        "records": len(scored.rows) + skipped,
        "scored": len(scored.rows),
        "skipped_no_answer": skipped,
        "max_new_tokens": max_new_tokens,
        **scored.scores,
        "loss": loss,
        "perplexity": metrics.perplexity(loss) if loss is not None else None,
        "loss_tokens": loss_tokens,
        "loss_records": sum(x is not None for x in scored.losses),
        "loss_truncated": scored.truncated,
        "generated_tokens": sum(f.completion_tokens for f in scored.finishes),
        "generate_seconds": round(scored.generate_seconds, 3),
        "tokenization": TOKENIZATION,
        "predictions": str(predictions),
    }


def write_outputs(out: Path, predictions: Path, summary: dict, lines: list[str]) -> None:
    """The predictions and the summary, both atomically (non-finite numbers as null)."""
    write_files_atomically(
        {
            predictions: "".join(line + "\n" for line in lines),
            out: json.dumps(finite_json(summary), ensure_ascii=False, indent=2, allow_nan=False) + "\n",
        }
    )
