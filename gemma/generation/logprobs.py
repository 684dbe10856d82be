"""Log-probabilities of tokens, as evaluation harnesses read them: for each token, its own log-probability under the
model and the `top` most likely alternatives at that position (`TokenLogprob`).

`next_token_logprob` scores one sampled token from its row of logits (a generation step's); `prompt_logprobs`
scores every token of a prompt after the first from the hidden states of one prefill over the whole prompt. Both
take the model's own distribution, log_softmax of the (vocabulary-masked) logits in float32, before temperature or
any filter: what vLLM reports by default, and what a full forward pass gives (in fp32 the prompt's figures equal it
bit for bit, tested)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_TOP_LOGPROBS = 20  # alternatives per position at most (vLLM's default cap; OpenAI's is 5)
_CHUNK = 128  # prompt positions whose logits (chunk x vocabulary floats) are held at once


@dataclass(frozen=True)
class TokenLogprob:
    """One token's log-probability and the `top` most likely tokens at its position, most likely first."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...]


def _scored(logprobs: torch.Tensor, tokens: torch.Tensor, top: int) -> list[TokenLogprob]:
    """TokenLogprobs of `tokens` (N,) from their rows of log-probabilities (N, V)."""
    own = logprobs.gather(-1, tokens[:, None])[:, 0].tolist()
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
        alternatives = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        alternatives = [()] * len(own)
    return [TokenLogprob(t, lp, alt) for t, lp, alt in zip(tokens.tolist(), own, alternatives)]


def log_softmax(logits: torch.Tensor, vocab_limit: int) -> torch.Tensor:
    """Log-probabilities (float32) of logits (..., V) whose ids past `vocab_limit` (rows of the embedding with no
    piece, never sampled) are left out."""
    logits = logits.float()
    if vocab_limit < logits.shape[-1]:
        logits = logits[..., :vocab_limit]
    return torch.log_softmax(logits, dim=-1)


def next_token_logprob(logits: torch.Tensor, token: int, top: int, vocab_limit: int) -> TokenLogprob:
    """The TokenLogprob of `token`, sampled from `logits` (V,) or (1, V)."""
    row = log_softmax(logits.reshape(-1), vocab_limit)
    return _scored(row[None], torch.tensor([token], device=row.device), top)[0]


def prompt_logprobs(model, hidden: torch.Tensor, prompt: list[int], top: int, vocab_limit: int) -> list:
    """[None, TokenLogprob of prompt[1], ...]: each token after the first scored by the logits of the position
    before it. `hidden` (1, P, hidden) are the prompt's final hidden states (model.hidden_states over all of it);
    the output head runs over `_CHUNK` positions at a time, so that a long prompt never holds P x V logits."""
    tokens = torch.tensor(prompt[1:], device=hidden.device)
    before = hidden[0, : len(prompt) - 1]  # position p's logits score the token at p + 1
    out: list = [None]
    for start in range(0, len(before), _CHUNK):
        logits = model.logits(before[start : start + _CHUNK][None])[0]
        out += _scored(log_softmax(logits, vocab_limit), tokens[start : start + _CHUNK], top)
    return out
