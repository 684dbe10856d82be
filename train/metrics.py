"""Scores of generated answers against reference answers, and the loss of the references under a model.

Text scores (ROUGE-1/2/L F1 from rouge-score, BLEU-4 from sacrebleu, exact match) compare tokens made by one rule,
`words`: each Chinese character is a token of its own (as are Japanese kana: neither script puts spaces between
words), and other text splits into words (runs of letters, digits, combining marks and underscores) and punctuation
marks, one token each. Mixed text follows the same rule character by character: "用Python写代码!" is
用 / Python / 写 / 代 / 码 / !. Case is kept and nothing is stemmed, so every score compares what the model wrote.
The libraries count n-grams, longest common subsequences, brevity penalty; only the tokenisation is ours.

- ROUGE: the F1 of each record, averaged over the records.
- BLEU-4: sacrebleu's corpus BLEU over all records (n-gram counts summed, then one brevity penalty), on a 0-1
  scale, with effective order: n-gram orders that no reference has (a set of one-word answers) are left out
  rather than zeroing the score. Per record, sentence BLEU the same way.
- Exact match: the answer equals the reference once both are stripped of surrounding whitespace.
- An answer whose tokens equal the reference's scores 1 everywhere, including orders that neither has an n-gram
  of (ROUGE-2 of a one-word answer), and so does a corpus of such answers for BLEU.

The loss is the mean cross-entropy over the reference answers' tokens (each model turn's content and its
<end_of_turn>, encoded exactly as training encodes them), summed over all records and divided by their token count;
the perplexity is exp(loss).
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass

import torch

from gemma.errors import GemmaError

_EXTRA_HINT = "pip install -e '.[eval]' (rouge-score and sacrebleu)"


def _is_cjk(ch: str) -> bool:
    """Chinese characters (all CJK ideograph blocks) and Japanese kana."""
    o = ord(ch)
    return (
        0x4E00 <= o <= 0x9FFF
        or 0x3400 <= o <= 0x4DBF
        or 0x20000 <= o <= 0x323AF
        or 0xF900 <= o <= 0xFAFF
        or 0x2F800 <= o <= 0x2FA1F
        or 0x3040 <= o <= 0x30FF
        or 0x31F0 <= o <= 0x31FF
    )


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_" or unicodedata.category(ch).startswith("M")


def words(text: str) -> list[str]:
    """Tokens of `text` for scoring: Chinese characters one by one, other text by words and punctuation marks."""
    tokens, word = [], []
    for ch in text:
        if _is_word(ch) and not _is_cjk(ch):
            word.append(ch)
            continue
        if word:
            tokens.append("".join(word))
            word = []
        if not ch.isspace():
            tokens.append(ch)  # a Chinese character or a punctuation mark
    if word:
        tokens.append("".join(word))
    return tokens


class _Words:
    """`words` in the shape rouge-score takes a tokenizer."""

    def tokenize(self, text: str) -> list[str]:
        return words(text)


def _libraries():
    try:
        import sacrebleu
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise GemmaError(f"scoring needs {exc.name}: {_EXTRA_HINT}") from None
    return rouge_scorer, sacrebleu


def check_scoring_available() -> None:
    """Raise GemmaError now if the scoring libraries are missing (before a long model load)."""
    _libraries()


def is_exact_match(prediction: str, reference: str) -> bool:
    """Exact match, for tools/evaluate.py and the training report alike: equal once both are stripped."""
    return prediction.strip() == reference.strip()


@dataclass
class RecordScores:
    exact_match: bool
    rouge1: float
    rouge2: float
    rougeL: float
    bleu: float  # sentence BLEU-4 with effective order, 0-1


def score_record(prediction: str, reference: str) -> RecordScores:
    rouge_scorer, sacrebleu = _libraries()
    exact = is_exact_match(prediction, reference)
    p, r = words(prediction), words(reference)
    if p == r:  # identical, even where an order has no n-gram to count (a one-word answer has no bigram)
        return RecordScores(exact, 1.0, 1.0, 1.0, 1.0)
    rouge = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=_Words()).score(reference, prediction)
    bleu = sacrebleu.metrics.BLEU(tokenize="none", effective_order=True)
    sentence = min(bleu.sentence_score(" ".join(p), [" ".join(r)]).score / 100, 1.0) if p and r else 0.0
    return RecordScores(exact, rouge["rouge1"].fmeasure, rouge["rouge2"].fmeasure, rouge["rougeL"].fmeasure, sentence)


def corpus_bleu(predictions: list[str], references: list[str]) -> float:
    """sacrebleu's corpus BLEU-4 on `words` tokens, effective order, 0-1."""
    _, sacrebleu = _libraries()
    p = [" ".join(words(x)) for x in predictions]
    r = [" ".join(words(x)) for x in references]
    if p == r:
        return 1.0
    score = sacrebleu.metrics.BLEU(tokenize="none", effective_order=True).corpus_score(p, [r]).score
    return min(score / 100, 1.0)  # a perfect score can come out a rounding error above 100


def text_scores(predictions: list[str], references: list[str]) -> tuple[dict, list[RecordScores]]:
    """({"exact_match", "rouge1", "rouge2", "rougeL", "bleu"}, per-record scores) of answers against references."""
    if len(predictions) != len(references):
        raise ValueError("as many predictions as references are needed")
    if not references:
        raise GemmaError("nothing to score: no record has a reference answer")
    rows = [score_record(p, r) for p, r in zip(predictions, references)]
    n = len(rows)
    summary = {
        "exact_match": sum(r.exact_match for r in rows) / n,
        "rouge1": sum(r.rouge1 for r in rows) / n,
        "rouge2": sum(r.rouge2 for r in rows) / n,
        "rougeL": sum(r.rougeL for r in rows) / n,
        "bleu": corpus_bleu(predictions, references),
    }
    return summary, rows


def perplexity(loss: float) -> float | None:
    """exp(loss); None if it overflows a float."""
    try:
        return math.exp(loss)
    except OverflowError:
        return None


@torch.no_grad()
def reference_losses(model, examples, pad_id: int, batch_size: int = 8, progress=None) -> list[tuple[float, int]]:
    """(summed cross-entropy, target tokens) of each example (train.data.Example): the model's loss on the tokens
    that training would train on, computed with train.loss.chunked_cross_entropy."""
    from train.data import collate
    from train.loss import chunked_cross_entropy

    was_training = model.training
    model.eval()
    out: list[tuple[float, int] | None] = [None] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i]))  # similar lengths share a batch
    try:
        for at in range(0, len(order), batch_size):
            chunk = order[at : at + batch_size]
            batch = collate([examples[i] for i in chunk], pad_id)
            hidden = model.hidden_states(batch["tokens"].to(model.device))  # (B, T, H)
            targets = batch["targets"].to(model.device)
            for row, i in enumerate(chunk):
                total, n = chunked_cross_entropy(model, hidden[row : row + 1], targets[row : row + 1])
                out[i] = (float(total), n)
            if progress is not None:
                progress(len(chunk))
    finally:
        model.train(was_training)
    return out


def mean_loss(losses: list[tuple[float, int]]) -> tuple[float | None, int]:
    """(loss per target token over all records, target tokens); loss None when there is no target token."""
    tokens = sum(n for _, n in losses)
    return (sum(total for total, _ in losses) / tokens if tokens else None), tokens
