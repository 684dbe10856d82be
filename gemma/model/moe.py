"""Gemma 4's mixture-of-experts block (26B-A4B): a router over the residual stream picks `experts_per_token` of
`num_experts` GeGLU experts for each token, beside the layer's always-on dense MLP.

Router: a weightless RMSNorm of the residual, times a learned per-channel scale and hidden_size ** -0.5, projected
to one logit per expert; softmax over all experts in float32, the top k kept and renormalised to sum to 1, each then
multiplied by its expert's learned scale. The experts' weights are two 3-D tensors (gate and up stacked:
(E, 2 I, H); down: (E, H, I)), as the checkpoints store them; they stay frozen under LoRA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma.model.config import GemmaConfig
from gemma.model.layers import Linear, RMSNorm, rms_norm


class MoE(nn.Module):
    """(N, hidden) residual rows -> (N, hidden): the weighted sum of each row's chosen experts, normed on the way
    in (`in_norm`) and out (`out_norm`)."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        H, E, inner = cfg.hidden_size, cfg.num_experts, cfg.expert_intermediate_size
        self.top_k, self.eps = cfg.experts_per_token, cfg.norm_eps
        self.router = Linear(H, E)
        self.router_scale = nn.Parameter(torch.ones(H))  # per channel, before the router's projection
        self.expert_scale = nn.Parameter(torch.ones(E))  # per expert, after the top-k renormalisation
        self.gate_up = nn.Parameter(torch.empty(E, 2 * inner, H))  # gate rows first, then up
        self.down = nn.Parameter(torch.empty(E, H, inner))
        self.in_norm = RMSNorm(H, cfg.norm_eps, cfg.norm_offset)
        self.out_norm = RMSNorm(H, cfg.norm_eps, cfg.norm_offset)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights (N, k) float32, expert ids (N, k)) for residual rows x (N, hidden)."""
        z = rms_norm(x, None, self.eps) * self.router_scale * x.shape[-1] ** -0.5
        probs = F.softmax(self.router(z), dim=-1, dtype=torch.float32)
        weights, ids = probs.topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights * self.expert_scale[ids], ids

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.route(x)
        h = self.in_norm(x)
        out = torch.zeros_like(h)
        # Expert by expert in id order, each over the rows routed to it, summed into `out` as the reference does
        # (so that float32 sums come out in the same order); a token's weight multiplies in float32.
        for e in ids.unique().tolist():
            rows, slot = torch.where(ids == e)
            gate, up = F.linear(h[rows], self.gate_up[e]).chunk(2, dim=-1)
            y = F.linear(F.gelu(gate, approximate="tanh") * up, self.down[e]) * weights[rows, slot, None]
            out.index_add_(0, rows, y.to(out.dtype))
        return self.out_norm(out)
