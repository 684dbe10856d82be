"""Cross-entropy over the target tokens only, in chunks, so the [batch, seq, vocab] logits never exist at once.

With a 256k-262k vocabulary the logits are the largest activation of the model (512 tokens x 262144 x 4 bytes =
0.5 GB per sequence) and the output head the largest matmul. We gather the positions that have a target (prompt
tokens have none), then run the output head and the loss a chunk of them at a time.

In training each chunk also computes its gradient with respect to the hidden states at once, in the forward pass
(the loss is the last thing before backward, so nothing else is needed), and only that (N x hidden) is kept. The
logits are thus made once, where activation checkpointing would make them twice (forward, then again in
backward). Every chunk reuses one (chunk x vocab) buffer in the compute dtype, and the float32 softmax runs a few
rows at a time in cache-sized buffers: on CPU a fresh buffer of logits costs more in page faults, and a pass over
one in memory bandwidth, than the arithmetic done in it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torch.utils.checkpoint

IGNORE = -100  # the target of a position that takes no loss (cross_entropy's default ignore_index)
CACHED = 1 << 21  # float32 elements (8 MB) of logits that the softmax works on at a time


def _chunk_loss(model, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(model.logits(h), targets, reduction="sum")  # logits are float32


def head_loss(
    model, h: torch.Tensor, targets: torch.Tensor, chunk: int, need_grad: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(summed cross-entropy, its gradient with respect to h or None) for h (N, H) and targets (N,).

    The arithmetic is `F.cross_entropy(model.logits(h), targets, reduction="sum")` and its autograd backward (for
    an output gradient of 1), step for step and in the same dtypes: the tied head in the compute dtype
    (autocast's, else h's), the logits cast to float32, the final softcap tanh(z / cap) * cap, log-softmax; its
    gradient softmax - one_hot, back through the softcap, cast to the compute dtype, times the head. Only the
    buffers are managed by hand.

    The head runs `chunk` rows at a time (a large matmul), the softmax a few rows at a time (`CACHED` float32
    elements), so that its several passes over the float32 logits stay in cache and only the head's output, in
    the compute dtype, goes through memory: once out of the matmul, once back in as the gradient.
    """
    weight = model.embed.weight  # (vocab, H): the output head is tied to the embedding
    cap = model.config.final_softcap
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    w = weight.to(dtype)
    vocab, n = w.shape[0], len(targets)
    rows, sub = min(chunk, n), max(1, min(chunk, CACHED // vocab))
    out = torch.empty(rows, vocab, dtype=dtype, device=h.device)  # the head's output, then the logits' gradient
    logits = torch.empty(sub, vocab, device=h.device)
    logp = torch.empty(sub, vocab, device=h.device)  # log-softmax, then the gradient in place
    tanh = torch.empty(sub, vocab, device=h.device) if cap is not None else None  # kept for the gradient
    picked = torch.empty(n, device=h.device)  # the log-probability of each target
    grad = torch.empty(n, w.shape[1], dtype=dtype, device=h.device) if need_grad else None
    for i in range(0, n, chunk):
        k = min(chunk, n - i)
        torch.mm(h[i : i + k].to(dtype), w.t(), out=out[:k])  # (k, vocab)
        for j in range(0, k, sub):
            m = min(sub, k - j)
            o, t = out[j : j + m], targets[i + j : i + j + m]
            z = logits[:m].copy_(o)  # float32
            if cap is not None:
                th = torch.div(z, cap, out=tanh[:m]).tanh_()
                z = torch.mul(th, cap, out=z)
            lp = torch.log_softmax(z, dim=-1, out=logp[:m])
            at = torch.arange(m, device=h.device)
            picked[i + j : i + j + m] = lp[at, t]
            if need_grad:
                g = lp.exp_()  # softmax
                g[at, t] -= 1.0  # - one_hot
                if cap is not None:  # d(tanh(z / cap) * cap) = (1 - tanh^2) dz, in autograd's order of operations
                    g.mul_(cap).mul_(th.mul_(th).neg_().add_(1.0)).div_(cap)
                o.copy_(g)  # to the compute dtype
        if need_grad:
            torch.mm(out[:k], w, out=grad[i : i + k])
    return -picked.sum(), grad


class _FusedHeadLoss(torch.autograd.Function):
    """The summed loss; its backward scales the gradient that the forward pass already computed.

    Autograd would scale the logits' gradient before the head's matmul; scaling after it adds one rounding in
    the compute dtype (the tests check that the result is as accurate).
    """

    @staticmethod
    def forward(ctx, h, model, targets, chunk):
        loss, grad = head_loss(model, h, targets, chunk, need_grad=True)
        ctx.h_dtype = h.dtype
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_loss).to(ctx.h_dtype), None, None, None


def chunked_cross_entropy(
    model, hidden: torch.Tensor, targets: torch.Tensor, chunk: int = 256
) -> tuple[torch.Tensor, int]:
    """(sum of the token losses, number of target tokens) for hidden (B, T, H) and targets (B, T).

    The caller divides by the target-token count of the whole accumulated (and distributed) batch. With autograd
    on, the hidden states' gradient is computed here, in the forward pass; backward only scales it (there is no
    double backward).
    """
    keep = targets != IGNORE
    h, t = hidden[keep], targets[keep]  # (N, H), (N,)
    n = int(t.numel())
    if n == 0:
        return hidden.new_zeros((), dtype=torch.float32) + 0.0 * hidden.sum(), 0  # keeps the graph connected
    if model.quantized:  # a quantized head (gemma.model.quantize, inference only): the model's own
        return sum(_chunk_loss(model, h[i : i + chunk], t[i : i + chunk]) for i in range(0, n, chunk)), n
    if not (torch.is_grad_enabled() and h.requires_grad):
        return head_loss(model, h, t, chunk, need_grad=False)[0], n
    # A frozen head, or a quantized one (--base-quant-embed: no parameters, its table dequantized when read).
    if not any(p.requires_grad for p in model.embed.parameters()):
        return _FusedHeadLoss.apply(h, model, t, chunk), n
    # A trainable head (not under LoRA, which freezes the base): autograd, recomputing each chunk's logits.
    total = hidden.new_zeros((), dtype=torch.float32)
    for i in range(0, n, chunk):
        total = total + torch.utils.checkpoint.checkpoint(
            _chunk_loss, model, h[i : i + chunk], t[i : i + chunk], use_reentrant=False
        )
    return total, n
