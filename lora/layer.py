"""The LoRA linear layer, and the merge arithmetic shared by in-place merging and state-dict merging.

A `LoRALinear` replaces an `nn.Linear` (no bias) and keeps its parameter name `weight`, so a base checkpoint loads
into an injected model unchanged. Its adapter parameters are `lora_A` (r, in), `lora_B` (out, r) and, for DoRA,
`magnitude` (out,): in peft's files they are `lora_A.weight`, `lora_B.weight` and `lora_magnitude_vector`.

    plain LoRA:  y = W x + scale * B A dropout(x)
    DoRA:        y = m / ||W + scale * B A||_row * (W + scale * B A) x      (row norm detached, as in peft)

with scale = alpha / r (alpha / sqrt(r) with rsLoRA).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from gemma.errors import GemmaError
from gemma.model.base_quant import compute_dtype
from gemma.model.layers import AdaptedLinear
from gemma.model.matvec import linear


def dora_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float) -> torch.Tensor:
    """||W + scale * B A|| over each output row (out,): DoRA's denominator, as peft computes it."""
    return torch.linalg.norm(weight + scale * (lora_B @ lora_A), dim=1)


def merge_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(merged weight in weight's dtype, DoRA row norm in float32 or None). Pure.

    The arithmetic runs in float32 and is rounded to the weight's dtype once, so a bf16 merge loses no more than
    one rounding; the norm is returned because unmerging DoRA needs the norm of the unmerged weight.
    """
    w = weight.float()
    delta = scale * (lora_B.float() @ lora_A.float())  # (out, in)
    if magnitude is None:
        return (w + delta).to(weight.dtype), None
    norm = torch.linalg.norm(w + delta, dim=1)  # (out,)
    return ((magnitude.float() / norm)[:, None] * (w + delta)).to(weight.dtype), norm


def unmerge_weight(
    weight: torch.Tensor,
    lora_A: torch.Tensor,
    lora_B: torch.Tensor,
    scale: float,
    magnitude: torch.Tensor | None = None,
    norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """The inverse of `merge_weight` (DoRA needs the norm that merge returned). Pure."""
    w = weight.float()
    delta = scale * (lora_B.float() @ lora_A.float())
    if magnitude is not None:
        w = w / (magnitude.float() / norm)[:, None]
    return (w - delta).to(weight.dtype)


class _LoRAMatmul(torch.autograd.Function):
    """W x + scale * B A dx for a frozen W, as one autograd node (dx: x after dropout, None when no dropout).

    The arithmetic of `F.linear(x, W) + F.linear(F.linear(dx, A), B) * scale` under autocast, in the compute
    dtype (autocast's, else x's), with the scale and the sum folded into the matmuls (`addmm`): the update is
    added in the matmul's float32 accumulator and rounded once, and no (..., out) temporaries are made for the
    scaling and the sum, forward or backward. Only what the adapter's gradients need is kept: dx and A dx.
    """

    @staticmethod
    def forward(ctx, x, dx, weight, lora_A, lora_B, scale):
        device, dtype = x.device.type, compute_dtype(x)
        # A quantized base (gemma.model.base_quant) is dequantized here and again in backward, never kept.
        quantized = not isinstance(weight, torch.Tensor)
        with torch.autocast(device, enabled=False):
            w = weight.dequantize(dtype) if quantized else weight.to(dtype)
            a, b = lora_A.to(dtype), lora_B.to(dtype)
            x2 = x.reshape(-1, x.shape[-1]).to(dtype)  # (N, in)
            d2 = x2 if dx is None else dx.reshape(-1, dx.shape[-1]).to(dtype)
            out = torch.mm(x2, w.t())  # (N, out)
            xa = torch.mm(d2, a.t())  # (N, r)
            out.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(d2, xa, None if quantized else w, a, b)
        ctx.qweight = weight if quantized else None
        ctx.scale, ctx.dropout = scale, dx is not None
        ctx.dtypes = (x.dtype, None if dx is None else dx.dtype, lora_A.dtype, lora_B.dtype)
        return out.view(*x.shape[:-1], w.shape[0])

    @staticmethod
    def backward(ctx, grad):
        d2, xa, w, a, b = ctx.saved_tensors
        if ctx.qweight is not None:
            w = ctx.qweight.dequantize(a.dtype)
        x_dtype, dx_dtype, a_dtype, b_dtype = ctx.dtypes
        shape = grad.shape[:-1]
        need_x, need_dx, _, need_a, need_b, _ = ctx.needs_input_grad
        grad_x = grad_dx = grad_a = grad_b = None
        with torch.autocast(grad.device.type, enabled=False):
            g = grad.reshape(-1, grad.shape[-1]).to(w.dtype)  # (N, out)
            gxa = torch.mm(g, b).mul_(ctx.scale)  # (N, r): the gradient at A dx
            if need_b:
                grad_b = torch.mm(g.t(), xa).mul_(ctx.scale).to(b_dtype)  # (out, r)
            if need_a:
                grad_a = torch.mm(gxa.t(), d2).to(a_dtype)  # (r, in)
            if need_x:
                grad_x = torch.mm(g, w)  # (N, in)
                if not ctx.dropout:
                    grad_x = grad_x.addmm_(gxa, a).to(x_dtype).view(*shape, -1)
                else:
                    grad_x = grad_x.to(x_dtype).view(*shape, -1)
            if need_dx:  # dropout's own backward takes the branch's gradient on to x
                grad_dx = torch.mm(gxa, a).to(dx_dtype).view(*shape, -1)
        return grad_x, grad_dx, None, grad_a, grad_b, None


class LoRALinear(AdaptedLinear):
    """A bias-free linear layer with a frozen `weight` and a trainable low-rank update (optionally DoRA).

    An `AdaptedLinear`, so that the model's own code knows it (int8 quantization takes a merged one's weight)."""

    def __init__(self, weight: nn.Parameter, r: int, scale: float, dropout: float = 0.0, dora: bool = False):
        super().__init__()
        out_features, in_features = weight.shape
        self.in_features, self.out_features = in_features, out_features
        self.r, self.scale, self.dropout = r, scale, dropout
        self.weight = weight
        self.weight.requires_grad_(False)
        like = dict(dtype=weight.dtype, device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, in_features, **like))
        self.lora_B = nn.Parameter(torch.empty(out_features, r, **like))
        if dora:
            self.magnitude = nn.Parameter(torch.empty(out_features, **like))
        else:
            self.register_parameter("magnitude", None)
        self.merged = False
        # DoRA: the unmerged weight's row norm, kept for unmerge (a buffer so that it follows .to(); not saved).
        self.register_buffer("_merged_norm", None, persistent=False)
        self.reset_lora_parameters()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, r: int, scale: float, dropout: float = 0.0, dora: bool = False
    ) -> "LoRALinear":
        """Wrap an existing bias-free nn.Linear, sharing (not copying) its weight."""
        if linear.bias is not None:
            raise ValueError("LoRALinear wraps bias-free linear layers only")
        layer = cls(linear.weight, r, scale, dropout, dora)
        return layer.train(linear.training)

    @torch.no_grad()
    def reset_lora_parameters(self) -> None:
        """peft's default: A Kaiming-uniform (as nn.Linear initialises its weight), B zeros, so the update starts at
        zero; DoRA's magnitude starts at the row norm of the weight, so the layer starts as the base layer."""
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B)
        if self.magnitude is not None:
            self.magnitude.copy_(dora_norm(self.weight, self.lora_A, self.lora_B, self.scale))

    def adapter_parameters(self) -> dict[str, nn.Parameter]:
        """The trainable parameters by local name: lora_A, lora_B (and magnitude for DoRA)."""
        out = {"lora_A": self.lora_A, "lora_B": self.lora_B}
        if self.magnitude is not None:
            out["magnitude"] = self.magnitude
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged:
            return linear(x, self.weight)
        dx = F.dropout(x, self.dropout, self.training) if self.dropout and self.training else x
        autocast = torch.is_autocast_enabled(x.device.type)
        if self.magnitude is None and not self.weight.requires_grad and (autocast or self.lora_A.dtype == x.dtype):
            return _LoRAMatmul.apply(x, None if dx is x else dx, self.weight, self.lora_A, self.lora_B, self.scale)
        weight = self.base_weight(x)
        out = F.linear(x, weight)
        # The adapter may be kept in float32 over a bf16 base (training). Outside autocast, match dtypes by hand.
        if not autocast:
            dx = dx.to(self.lora_A.dtype)
        lora = F.linear(F.linear(dx, self.lora_A), self.lora_B).to(out.dtype)  # (..., out)
        if self.magnitude is None:
            return out + lora * self.scale
        # DoRA. The row norm is a constant for the backward pass (DoRA paper, section 4.3; peft detaches it), so it
        # is computed without building a graph.
        with torch.no_grad():
            norm = dora_norm(weight, self.lora_A, self.lora_B, self.scale)
        factor = self.magnitude / norm  # (out,)
        # With dropout active the base term must see the same dropped input as the LoRA term (peft does the same).
        base = out if dx is x else F.linear(dx, weight)
        return out + ((factor - 1) * base + factor * lora * self.scale)

    @property
    def quantized(self) -> bool:
        """Whether the frozen weight is stored quantized (gemma.model.base_quant), not as a tensor."""
        return not isinstance(self.weight, torch.Tensor)

    def base_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen weight as a tensor: itself, or dequantized to x's compute dtype."""
        return self.weight.dequantize(compute_dtype(x)) if self.quantized else self.weight

    @torch.no_grad()
    def merge(self) -> None:
        """Fold the update into `weight` in place; a second call does nothing. The forward pass is then a plain
        linear layer (for inference: the adapter parameters get no gradient while merged)."""
        if self.merged:
            return
        if self.quantized:
            raise GemmaError(
                "cannot merge a LoRA update into a quantized base in place; merge into the unquantized "
                "model (load it without --base-quant)"
            )
        merged, self._merged_norm = merge_weight(self.weight, self.lora_A, self.lora_B, self.scale, self.magnitude)
        self.weight.copy_(merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Take the update back out of `weight`; a call on an unmerged layer does nothing."""
        if not self.merged:
            return
        self.weight.copy_(
            unmerge_weight(self.weight, self.lora_A, self.lora_B, self.scale, self.magnitude, self._merged_norm)
        )
        self.merged, self._merged_norm = False, None

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, r={self.r}, scale={self.scale:g}, "
            f"dropout={self.dropout:g}, dora={self.magnitude is not None}, merged={self.merged}"
        )
