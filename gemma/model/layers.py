"""The small building blocks: RMSNorm, rotary embeddings, the GeGLU MLP."""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from gemma.model.matvec import fresh, linear


class Linear(nn.Linear):
    """A bias-free nn.Linear whose single-row inputs take the fastest kernel for one row (gemma.model.matvec)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight)


class AdaptedLinear(nn.Module):
    """The base of a bias-free linear layer that carries an adapter over its frozen `weight` (out, in): declared
    here so that the model's code (gemma.model.quantize) recognises one without importing lora/, whose
    `LoRALinear` derives from it. `merged` is True while the adapter's update is folded into `weight`, which then
    is the whole layer."""

    weight: nn.Parameter
    merged: bool = False


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """Gemma 2's logit softcap, tanh(x / cap) * cap: the attention scores' and the output logits'. train/loss.py's
    fused head loss spells the same arithmetic out into its own buffers (its gradient needs the tanh)."""
    return torch.tanh(x / cap) * cap


class Embedding(nn.Embedding):
    """The token embedding, whose table is also the output head (Gemma ties them): `project(h)` = h @ table.T."""

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return linear(fresh(h), self.weight)


class RMSNorm(nn.Module):
    """RMSNorm: x / rms(x) * (offset + w). Gemma 1-3 keep a zero-centred weight (offset 1: x / rms(x) * (1 + w));
    Gemma 4 multiplies by the weight itself (offset 0, the weight initialised to ones), and some of its norms
    (`weight=False`: the value norm, the router's) have no weight at all.

    Normalised and scaled in float32 and cast back only at the end, as the reference does; doing the multiply in
    the activation dtype (Llama-style) loses precision in bf16.
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 1.0, weight: bool = True):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.full((dim,), 1.0 - offset)) if weight else None  # x / rms(x) at init
        self.kernels = EAGER  # gemma.model.compiled swaps in compiled ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.offset == 1.0:
            return self.kernels.rms_norm(x, self.weight, self.eps)
        return self.kernels.rms_norm(x, self.weight, self.eps, self.offset)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float, offset: float = 1.0) -> torch.Tensor:
    """x * rsqrt(mean(x^2) + eps) * (offset + w) in float32 (no multiply without a weight), cast back to x's dtype:
    PyTorch's rms_norm gives the same bits as the reference's separate ops (Gemma 4's `pow(..., -0.5)` included)."""
    if weight is None:
        scale = None
    else:
        scale = weight.float() if offset == 0.0 else offset + weight.float()
    return F.rms_norm(x.float(), (x.shape[-1],), scale, eps).type_as(x)


def rope_inv_freq(head_dim: int, theta: float, scaling: float = 1.0, device=None, rotated: float = 1.0) -> torch.Tensor:
    """Inverse frequencies (head_dim / 2,), float32; linear scaling divides them (stretches positions).

    `rotated` < 1 is Gemma 4's proportional RoPE (its full-attention layers): only the first
    int(rotated * head_dim // 2) frequencies turn, each with its exponent still over the whole head_dim; the others
    are 0, so their dimensions pass through unrotated (cos 1, sin 0)."""
    turning = int(rotated * head_dim // 2)
    exponents = torch.arange(0, 2 * turning, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    still = torch.zeros(head_dim // 2 - turning, device=device)
    return torch.cat((inv_freq, still)) / scaling


def rope_cos_sin(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """cos and sin (B, T, head_dim) for integer positions (B, T).

    Angles are computed in float32 from the integer positions, then cast to the activation dtype, as the
    reference does.
    """
    angles = positions[..., None].float() * inv_freq  # (B, T, hd/2)
    angles = torch.cat((angles, angles), dim=-1)  # (B, T, hd): rotate-half layout
    return angles.cos().to(dtype), angles.sin().to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, H, T, hd) by the angles; HF's rotate-half layout, so HF q/k weights need no permutation."""
    cos, sin = cos[:, None], sin[:, None]  # (B, 1, T, hd)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class GeGLU(nn.Module):
    """down(gelu_tanh(gate(x)) * up(x)). Gemma's GELU is the tanh approximation, not the exact erf form."""

    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate = Linear(hidden, intermediate)
        self.up = Linear(hidden, intermediate)
        self.down = Linear(intermediate, hidden)
        self.kernels = EAGER  # gemma.model.compiled swaps in compiled ones

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = fresh(x, self.gate)  # once for both products (see gemma.model.matvec)
        return self.down(fresh(self.kernels.gelu_mul(self.gate(x), self.up(x)), self.down))


def gelu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


# The elementwise functions the modules call through their `kernels` attribute (gemma.model.compiled gives a model
# compiled ones with the same names).
EAGER = SimpleNamespace(rms_norm=rms_norm, rope=apply_rope, gelu_mul=gelu_mul)
