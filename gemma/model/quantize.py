"""Opt-in quantized weights for inference: `--quantize int8` here, `--quantize int4` in gemma.model.int4.

int8: each weight matrix is stored as int8 with one float scale per output row (symmetric, round to nearest: w ~ q *
scale, |q| <= 127), which halves the bytes a decoding step reads from memory against bf16. Norms stay in the model's
dtype; activations, the KV cache and the logits are unchanged.

The seven projections run weight-only (activations stay bf16/fp32) through PyTorch's int8 matrix kernel. The tied
embedding / output head, two thirds of the 270M's weight bytes, is one int8 table: a token's embedding is its row
dequantized; the output head multiplies by the int8 table directly (see `Int8Embedding.project`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma.errors import GemmaError
from gemma.model.int4 import Int4Embedding, Int4Linear
from gemma.model.layers import AdaptedLinear, Linear
from gemma.model.transformer import Gemma

MODES = ("int8", "int4")


def quantize_rows(weight: torch.Tensor, block: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 q (N, K), float32 scale (N,)) with weight ~ q * scale[:, None]: symmetric, one scale per row.

    Worked out `block` rows at a time, so that the float32 working copy stays small (the 270M's embedding is
    671 MB in float32)."""
    N, K = weight.shape
    q = torch.empty(N, K, dtype=torch.int8, device=weight.device)
    scale = torch.empty(N, dtype=torch.float32, device=weight.device)
    for i in range(0, N, block):
        w = weight[i : i + block].detach().float()
        s = w.abs().amax(dim=1).clamp(min=torch.finfo(torch.float32).tiny) / 127.0
        q[i : i + block] = torch.round(w / s[:, None]).clamp_(-127, 127)
        scale[i : i + block] = s
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., K) @ (q * scale[:, None]).T -> (..., N) in x's dtype, without materialising the float weight on CPU."""
    lead, K = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, K)
    if x.device.type == "cpu":
        out = torch._weight_int8pack_mm(x2.contiguous(), q, scale.to(x.dtype))
    else:  # no fused kernel assumed: dequantize (correct everywhere; the saving is memory, not speed)
        out = F.linear(x2, q.to(x.dtype)) * scale.to(x.dtype)
    return out.view(*lead, q.shape[0])


class Int8Linear(nn.Module):
    """A bias-free linear layer holding int8 weights and per-row scales (weight-only quantization)."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]
        self.register_buffer("q", q)
        # in the compute dtype, which the kernel multiplies by: no conversion per call (nor in a compiled graph)
        self.register_buffer("scale", scale.to(weight.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return int8_matmul(x, self.q, self.scale)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8"


class Int8Embedding(nn.Module):
    """The tied embedding table in int8: lookup dequantizes the rows asked for; `project` is the output head."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        q, scale = quantize_rows(weight)
        self.num_embeddings, self.embedding_dim = weight.shape
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)  # float32, for the rows looked up
        self.register_buffer("head_scale", scale.to(weight.dtype))  # the head's, in the kernel's dtype
        self.compute_dtype = weight.dtype

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        rows = F.embedding(tokens, self.q).to(torch.float32) * self.scale[tokens, None]
        return rows.to(self.compute_dtype)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return int8_matmul(h, self.q, self.head_scale)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, int8"


def quantize_model(model: Gemma, mode: str = "int8") -> Gemma:
    """Replace, in place, every projection and the tied embedding of a Gemma by their `mode` forms (int8, int4);
    returns it.

    Inference only: the int8 weights are buffers, not parameters. A LoRA adapter must be merged first; its merged
    weights are what gets quantized."""
    if mode not in MODES:
        raise GemmaError(f"unknown quantization {mode!r}; choose one of {', '.join(MODES)}")
    if model.quantized:
        raise GemmaError(f"the model is already quantized ({model.quantized})")
    linear, embedding = (Int8Linear, Int8Embedding) if mode == "int8" else (Int4Linear, Int4Embedding)
    # The seven projections of each block (attention and MLP). Gemma 4's other linear layers stay as they are: the
    # per-layer embeddings' (quantizing them degrades the output badly, llama.cpp found) and the MoE router (its
    # top-k choice flips on small changes); so do the experts' 3-D weights.
    for module in [m for block in model.layers for m in (block.attn, block.mlp)]:
        for name, child in list(module.named_children()):
            if isinstance(child, Linear) or isinstance(child, AdaptedLinear) and child.merged:  # plain or merged
                setattr(module, name, linear(child.weight))
            elif isinstance(child, AdaptedLinear):
                raise GemmaError("merge the LoRA adapter before quantizing (its update would be lost)")
    model.embed = embedding(model.embed.weight)
    model.quantized = mode
    return model.eval().requires_grad_(False)
