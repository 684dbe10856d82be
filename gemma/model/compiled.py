"""Opt-in torch.compile (`gemma.load(..., compile=True)`, `--compile` on the tools): of each decoding step whole,
over a static-shape view of the cache (gemma.model.static_decode), and of the elementwise work in a prompt's forward
pass.

Prefilling a prompt spends about half its time outside the matrix products, in RMSNorm (eight passes over the
activations in float32), rotary embeddings and GeGLU's activation, op by op as the reference runs them. Compiled,
each becomes one fused loop (what that gains is measured by `tools/bench.py --compile`; the README's "Performance"
section has the figures). Only passes over several tokens without autograd use them (`multi_token`): a decoding
step, a few hundred small tensors where one compiled kernel costs more than it saves, is compiled whole instead, and
training keeps its exact eager arithmetic.

The fused loops round differently from the op-by-op ones (float32 sums in another order, another tanh): outputs
match the eager model to float32 rounding, not bit for bit, which is why this is not the default. The first
prompt of each new shape kind pays the compilation (~15 s on 2 CPU cores; cached on disk by PyTorch after that),
and the first decoding steps at each batch size theirs (~30 s; ~5 s from the disk cache).
Where compiling fails (no C++ compiler, an unsupported device), the model says so once and runs eagerly.
"""

from __future__ import annotations

import sys

import torch
from torch import nn

from gemma.model import layers
from gemma.model.attention import Attention
from gemma.model.static_decode import DecodeStep


def multi_token(x: torch.Tensor) -> bool:
    """Whether x (..., T, features) spans several tokens outside autograd: a prompt's forward pass, where compiled
    kernels pay; a decoding step (T = 1) and training stay eager."""
    return x.dim() >= 2 and x.shape[-2] > 1 and not torch.is_grad_enabled()


class _Kernel:
    """One elementwise function, compiled on first use, for multi-token inputs (its first argument); eager for the
    rest, and for good once compiling has failed."""

    def __init__(self, fn):
        self.eager = fn
        self.compiled = torch.compile(fn, dynamic=True)
        self.failed = False

    def __call__(self, *args):
        if not self.failed and multi_token(args[0]):
            try:
                return self.compiled(*args)
            except Exception as exc:  # compiler errors come in many types
                out = self.eager(*args)  # bad inputs raise here, as they would without compiling
                self.failed = True
                first = (str(exc).strip().splitlines() or [""])[0][:200]
                print(
                    f"note: torch.compile failed ({type(exc).__name__}: {first}); running uncompiled", file=sys.stderr
                )
                return out
        return self.eager(*args)


class Kernels:
    """The compiled counterparts of `layers.EAGER`, shared by one model's modules (one compiled graph per kind
    of input)."""

    def __init__(self):
        for name, fn in vars(layers.EAGER).items():
            setattr(self, name, _Kernel(fn))


def compile_model(model: nn.Module) -> nn.Module:
    """Give every RMSNorm, attention and GeGLU module of `model` the compiled kernels, and the model a compiled
    decoding step (`model.decode_step`, which gemma.generation.steps.decode_one_token takes); returns the model."""
    model.decode_step = DecodeStep(model)
    return _set_kernels(model, Kernels())


def uncompile_model(model: nn.Module) -> nn.Module:
    """Back to the eager kernels and decoding step."""
    model.decode_step = None
    return _set_kernels(model, layers.EAGER)


def _set_kernels(model: nn.Module, kernels) -> nn.Module:
    for module in model.modules():
        if isinstance(module, (layers.RMSNorm, layers.GeGLU, Attention)):
            module.kernels = kernels
    return model
