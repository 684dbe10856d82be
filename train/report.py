"""What a run shows its user beyond the metrics: exact match on held-out records, sample replies, a loss plot."""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from gemma.tokenizer import Tokenizer
from train.evaluate import reply_text, split_prompt
from train.metrics import is_exact_match

__all__ = ["exact_match", "generate_replies", "plot_losses", "split_prompt"]


@torch.no_grad()
def generate_replies(
    model, tokenizer: Tokenizer, conversations: list[list[dict]], max_new_tokens: int = 32, batch_size: int = 16
) -> list[str]:
    """Greedy replies to each conversation (which ends with a user turn), as text as tools/evaluate.py reads its
    answers (train.evaluate.reply_text). `gemma.generate` rather than the engine, which tools/evaluate.py runs:
    the same greedy tokens (tests/test_engine.py checks it), without a thread per call during training."""
    from gemma import generate

    was_training = model.training
    model.eval()
    replies = []
    for i in range(0, len(conversations), batch_size):
        prompts = [tokenizer.apply_chat(c) for c in conversations[i : i + batch_size]]
        for ids in generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0.0):
            replies.append(reply_text(tokenizer, ids))
    model.train(was_training)
    return replies


def exact_match(
    model, tokenizer: Tokenizer, records: list[list[dict]], max_new_tokens: int = 32
) -> tuple[float, list[dict]]:
    """Share of records whose greedy reply equals the reference answer (train.metrics.is_exact_match, as
    tools/evaluate.py scores it; the records split into prompt and reference as there too), and the rows."""
    pairs = [p for p in (split_prompt(m) for m in records) if p is not None]
    replies = generate_replies(model, tokenizer, [p for p, _ in pairs], max_new_tokens)
    rows = [
        {"prompt": p[-1]["content"], "reference": ref.strip(), "reply": r, "match": is_exact_match(r, ref)}
        for (p, ref), r in zip(pairs, replies)
    ]
    return (sum(r["match"] for r in rows) / max(len(rows), 1)), rows


def plot_losses(history: list[tuple[int, float, float | None]], path: Path) -> Path | None:
    """Train (and eval) loss against the step, as a PNG; None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    steps = [h[0] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [h[1] for h in history], label="train loss", linewidth=1.2)
    evals = [(h[0], h[2]) for h in history if h[2] is not None]
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats / target token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp)
        tmp.replace(path)
    except BaseException:  # a full disk: no half-written temporary left behind
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path
