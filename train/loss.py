"""Cross-entropy over the target tokens only, in chunks, so the [batch, seq, vocab] logits never exist at once.

With a 256k-262k vocabulary the logits are the largest activation of the model (512 tokens x 262144 x 4 bytes =
0.5 GB per sequence). We gather the positions that have a target (prompt tokens have none), then compute the
output head and the loss a chunk at a time under activation checkpointing: the backward pass recomputes each
chunk's logits instead of keeping them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE = -100


def _chunk_loss(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.logits(h), targets, reduction="sum")  # logits are float32


def chunked_cross_entropy(model, hidden: torch.Tensor, targets: torch.Tensor,
                          chunk: int = 256) -> tuple[torch.Tensor, int]:
    """(sum of the token losses, number of target tokens) for hidden (B, T, H) and targets (B, T).

    The caller divides by the target-token count of the whole accumulated (and distributed) batch.
    """
    keep = targets != IGNORE
    h, t = hidden[keep], targets[keep]  # (N, H), (N,)
    n = int(t.numel())
    total = hidden.new_zeros((), dtype=torch.float32)
    if n == 0:
        return total + 0.0 * hidden.sum(), 0  # keeps the graph connected (no-op gradient)
    for i in range(0, n, chunk):
        hc, tc = h[i:i + chunk], t[i:i + chunk]
        if torch.is_grad_enabled() and hc.requires_grad:
            total = total + torch.utils.checkpoint.checkpoint(_chunk_loss, model, hc, tc, use_reentrant=False)
        else:
            total = total + _chunk_loss(model, hc, tc)
    return total, n
