"""Opt-in int4 weights for inference (`--quantize int4`): each weight matrix is stored in 4 bits, with a scale and a
zero point per group of 32 input columns of each row (asymmetric, round to nearest: w ~ (q - 8) * scale + zero,
0 <= q <= 15), a quarter of the bytes a decoding step reads against bf16 (plus one scale and zero, in the compute
dtype, per 32 weights: 5 bits a weight in bf16). Norms, activations, the KV cache and the logits are unchanged.

On CPU the products run through PyTorch's int4 weight-only kernel (`torch._weight_int4pack_mm_for_cpu`), which
reads the 4-bit weight in its own blocked layout (`torch._convert_weight_to_int4pack_for_cpu`): rows in blocks of
64; within a block, byte (k, j) holds row j's column k in its low nibble and row j + 32's in its high one. The tied
embedding reads its rows back from that layout (`Int4Embedding.forward`), so the table is stored once; a test checks
the layout against the converter, should a PyTorch release change it. Elsewhere (CUDA) the weight is dequantized for
each product: correct, but the saving is memory only.

The scale and zero are rounded to the compute dtype before the 4-bit values are chosen, so that the values are the
nearest for the scale and zero the kernel will use. A shape the kernel cannot take (a row count not a multiple of
64, columns not a multiple of 32: tiny test models only) is padded with zero rows / columns, and the product's
extra outputs dropped.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

GROUP = 32  # input columns per scale and zero point (the kernel takes 32, 64, 128 or 256; as llama.cpp's Q4_0)
_ROWS = 64  # the kernel's row block
_BLOCK = 8192  # rows quantized at a time (keeps the float32 working copy of the 270M's embedding small)


def _ceil_to(n: int, m: int) -> int:
    return -(-n // m) * m


def quantize_groups(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(q uint8 (N, K) in 0..15, scales_and_zeros (N, K / GROUP, 2) in `dtype`) for weight (N, K), K % GROUP == 0,
    with weight ~ (q - 8) * scale + zero group by group; the scale and zero are what `dtype` can hold."""
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.uint8, device=weight.device)
    sz = torch.empty(N, K // GROUP, 2, dtype=dtype, device=weight.device)
    for i in range(0, N, _BLOCK):
        w = weight[i : i + _BLOCK].detach().float().view(-1, K // GROUP, GROUP)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15).clamp(min=torch.finfo(torch.float32).tiny).to(dtype).float()
        zero = (lo + 8 * scale).to(dtype).float()
        q[i : i + _BLOCK] = torch.round((w - zero[..., None]) / scale[..., None] + 8).clamp_(0, 15).view(-1, K)
        sz[i : i + _BLOCK] = torch.stack([scale, zero], -1).to(dtype)
    return q, sz


def pack(q: torch.Tensor) -> torch.Tensor:
    """The kernel's layout (N, K / 2) uint8 of q (N, K) in 0..15, N % 64 == 0, a block of rows at a time (the
    converter wants int32 values: 2.7 GB for the whole 270M embedding at once)."""
    return torch.cat(
        [torch._convert_weight_to_int4pack_for_cpu(q[i : i + _BLOCK].int(), 1) for i in range(0, len(q), _BLOCK)]
    )


def unpack_rows(packed: torch.Tensor, rows: torch.Tensor, K: int) -> torch.Tensor:
    """The 4-bit values (*rows.shape, K) uint8 of the rows asked for, read from the kernel's layout."""
    blocks = packed.view(-1, K, 32)  # (N / 64, K, 32): byte (k, j) of a block = rows j (low) and j + 32 (high)
    byte = blocks[rows // _ROWS, :, rows % 32]  # (*rows.shape, K)
    shift = (4 * ((rows % _ROWS) // 32)).to(torch.uint8)
    return (byte >> shift[..., None]) & 15


def dequantize(q: torch.Tensor, sz: torch.Tensor) -> torch.Tensor:
    """float32 (..., K) of 4-bit values q (..., K) and their groups' scales and zeros (..., K / GROUP, 2)."""
    groups = q.view(*q.shape[:-1], -1, GROUP).float() - 8
    return (groups * sz[..., :1].float() + sz[..., 1:].float()).flatten(-2)


class Int4Weight(nn.Module):
    """A weight (N, K) in 4 bits with group-wise scales and zeros, in the kernel's layout (padded if need be)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.out_features, self.in_features = N, K = weight.shape
        self.compute_dtype = weight.dtype
        Np, Kp = _ceil_to(N, _ROWS), _ceil_to(K, GROUP)
        if (Np, Kp) != (N, K):
            weight = F.pad(weight.detach(), (0, Kp - K, 0, Np - N))
        q, sz = quantize_groups(weight, weight.dtype)
        self.register_buffer("packed", pack(q))  # (Np, Kp / 2)
        self.register_buffer("scales_and_zeros", sz.transpose(0, 1).contiguous())  # (Kp / GROUP, Np, 2): the kernel's

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Rows of the dequantized weight (*index.shape, K) in the compute dtype."""
        Kp = self.packed.shape[1] * 2
        q = unpack_rows(self.packed, index, Kp)
        sz = self.scales_and_zeros[:, index].movedim(0, -2)  # (*index.shape, Kp / GROUP, 2)
        return dequantize(q, sz)[..., : self.in_features].to(self.compute_dtype)

    def matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., K) @ weight.T -> (..., N) in x's dtype."""
        if x.device.type != "cpu":  # no fused kernel assumed: dequantize (correct; the saving is memory, not speed)
            return F.linear(x, self.rows(torch.arange(self.out_features, device=x.device)).to(x.dtype))
        lead, K = x.shape[:-1], x.shape[-1]
        Kp = self.packed.shape[1] * 2
        x2 = x.reshape(-1, K)
        if Kp != K:
            x2 = F.pad(x2, (0, Kp - K))
        out = torch._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, GROUP, self.scales_and_zeros.to(x.dtype))
        if out.shape[1] != self.out_features:
            out = out[:, : self.out_features]
        return out.reshape(*lead, self.out_features)


class Int4Linear(nn.Module):
    """A bias-free linear layer holding int4 weights (weight-only quantization)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.weight4 = Int4Weight(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight4.matmul(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 (group {GROUP})"


class Int4Embedding(nn.Module):
    """The tied embedding table in int4: lookup dequantizes the rows asked for; `project` is the output head."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.table = Int4Weight(weight)
        self.num_embeddings, self.embedding_dim = weight.shape

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return self.table.matmul(h)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int4 (group {GROUP})"
