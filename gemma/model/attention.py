"""Attention for MHA / MQA / GQA with optional q/k norm, logit softcap and sliding window."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma.model.config import GemmaConfig
from gemma.model.kv_cache import KVCache
from gemma.model.layers import EAGER, Linear, RMSNorm
from gemma.model.layers import softcap as softcap_
from gemma.model.matvec import fresh


def attention_mask(
    positions: torch.Tensor, window: int | None, segment_ids: torch.Tensor | None = None
) -> torch.Tensor | None:
    """Boolean mask (B, 1, T, T), True where query t may attend to key s; None for plain causal attention.

    Causal by index; a sliding window keeps keys with q_pos - k_pos < window (the reference's convention);
    segment ids (packing, padding) keep each query inside its own segment.
    """
    T = positions.shape[-1]
    needs_window = window is not None and T > window
    if not needs_window and segment_ids is None:
        return None
    idx = torch.arange(T, device=positions.device)
    mask = (idx[None, :] <= idx[:, None])[None]  # (1, T, T)
    if needs_window:
        mask = mask & ((positions[:, :, None] - positions[:, None, :]) < window)  # (B, T, T)
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    return mask[:, None]  # (B, 1, T, T)


class Attention(nn.Module):
    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        self.layer, self.kind = layer, cfg.layer_types[layer]  # SLIDING or FULL
        kind = self.kind
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.kv_heads_of(kind), cfg.head_dim_of(kind)
        self.scale = cfg.attn_scale
        self.softcap = cfg.attn_softcap
        hd, kv = self.head_dim, self.num_kv_heads
        # KV sharing (Gemma 4 E2B, E4B): a reusing layer attends with the keys and values that the last earlier
        # layer of its kind (a storing one) produced in the same pass, so it has no k, v or k_norm of its own.
        self.reuses_kv, self.stores_kv = cfg.reuses_kv(layer), cfg.stores_kv(layer)
        self.q = Linear(cfg.hidden_size, cfg.num_heads * hd)
        self.k = None if self.reuses_kv else Linear(cfg.hidden_size, kv * hd)
        # Keys-equal-values (Gemma 4's full layers): the values are the key projection's raw output.
        self.v = Linear(cfg.hidden_size, kv * hd) if cfg.has_v(kind) and not self.reuses_kv else None
        self.o = Linear(cfg.num_heads * hd, cfg.hidden_size)
        self.q_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_offset) if cfg.use_qk_norm else None
        self.k_norm = RMSNorm(hd, cfg.norm_eps, cfg.norm_offset) if cfg.use_qk_norm and not self.reuses_kv else None
        self.v_norm = RMSNorm(hd, cfg.norm_eps, 0.0, weight=False) if cfg.use_v_norm and not self.reuses_kv else None
        self.kernels = EAGER  # gemma.model.compiled swaps in compiled ones

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor | None,
        cache: KVCache | None = None,
        last_only: bool = False,
        shared: tuple | None = None,
    ) -> tuple[torch.Tensor, tuple | None]:
        """(B, T, hidden) -> ((B, T, hidden), kv); with `last_only`, (B, 1, hidden): every column's keys and values
        (for the cache), the query and output of the last column only. KV sharing: a reusing layer attends with
        `shared`, the (keys, values, mask) that its kind's storing layer returned as `kv` in this pass (other layers
        return None). Passed by value, not through a shared dict: FSDP and checkpointing see them as inputs."""
        B, T, _ = x.shape
        Tq = 1 if last_only else T
        x = fresh(x, self.q)  # once for the q, k and v products (see gemma.model.matvec)
        q = self.q(x[:, T - Tq :]).view(B, Tq, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, Tq, hd)
        if self.q_norm is not None:
            q = self.q_norm(q)
        q = self.kernels.rope(q, cos[:, T - Tq :], sin[:, T - Tq :])
        if self.reuses_kv:
            k, v, mask = shared
        else:
            k = self.k(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)  # (B, KV, T, hd)
            v = k if self.v is None else self.v(x).view(B, T, self.num_kv_heads, self.head_dim).transpose(1, 2)
            if self.v_norm is not None:
                v = self.v_norm(v)
            if self.k_norm is not None:
                k = self.k_norm(k)
            k = self.kernels.rope(k, cos, sin)
            if cache is not None:
                k, v, mask = cache.update(self.layer, self.kind, k, v)  # (B, KV, S, hd), mask (B, 1, T, S)
        kv = (k, v, mask) if self.stores_kv else None
        if mask is not None and mask.shape[2] > Tq:
            mask = mask[:, :, -Tq:]
        out = attend(q, k, v, mask, self.scale, self.softcap)  # (B, H, Tq, hd)
        return self.o(out.transpose(1, 2).reshape(B, Tq, self.num_heads * self.head_dim)), kv


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float, softcap: float | None
) -> torch.Tensor:
    """softmax(q k^T * scale [softcapped] + mask) v for q (B, H, T, hd) and k, v (B, KV, S, hd).

    `mask` is boolean (B, 1, T, S) or None for causal attention, the T queries being the last T of the S keys.
    """
    T, S = q.shape[2], k.shape[2]
    if T == 1 and mask is not None and torch.compiler.is_compiling():
        return _attend_one(q, k, v, mask, scale, softcap)
    if softcap is None:
        if mask is None and 1 < T < S:  # SDPA's own causal mask pairs query t with key t (top left)
            mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
        # SDPA covers everything but the softcap; it broadcasts the kv heads itself. One query attends to all.
        return F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
    # Explicit path: tanh softcap between the scaled logits and the softmax, which SDPA cannot express.
    groups = q.shape[1] // k.shape[1]
    if groups > 1:
        k = k.repeat_interleave(groups, dim=1)  # (B, H, S, hd)
        v = v.repeat_interleave(groups, dim=1)
    scores = torch.matmul(q, k.transpose(2, 3)) * scale  # (B, H, T, S)
    scores = softcap_(scores, softcap)
    if mask is None:
        mask = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T)
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    # Softmax in float32, cast back before the value product, as the reference does.
    probs = F.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(probs, v)


def _attend_one(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float | None
) -> torch.Tensor:
    """One query per row under a mask, as the compiled decoding step (gemma.model.static_decode) attends over its
    whole fixed-size cache: two small matrix products with the query heads of each kv head as the rows, and the
    masked float32 softmax between them, which Inductor fuses. SDPA's CPU kernel costs 5x as much here (its
    fixed setup per call, over every slot of the buffer). The scores stay in float32 from the product on, so the
    rounding differs a little from the eager step's (compiling is opt-in for that reason)."""
    B, H, _, hd = q.shape
    KV = k.shape[1]
    # k (S, hd) first, as it lies in the cache: the CPU kernel copies a transposed k whole on every call
    scores = torch.matmul(k, q.reshape(B, KV, H // KV, hd).transpose(2, 3)).transpose(2, 3).float() * scale
    if softcap is not None:
        scores = softcap_(scores, softcap)
    scores = scores.masked_fill(~mask, torch.finfo(torch.float32).min)  # mask (B, 1, 1, S)
    probs = F.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(probs, v).reshape(B, H, 1, hd)
