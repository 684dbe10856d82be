"""`linear`, the projection every layer of the model calls, and how it multiplies a single row by a weight matrix:
a decoding step at batch 1 is nothing but such products, and at that size the kernel decides the speed.

Which kernel is fastest for one row differs between CPUs, and by a lot: on an Intel Xeon with AMX `torch.mv` streams
the 270M's 262144 x 640 output head in 15.5 ms against 24.7 ms through the general matmul kernel (`F.linear`), and
on an AMD EPYC (avx512_bf16, no AMX) it is the other way round, 26 ms against 13. So on CPU the choice is measured
where it runs: the first single-row product of each weight shape and dtype times both kernels a few times and keeps
the faster for the rest of the process (`GEMMA_MATVEC=mv` or `linear` fixes it instead). Both sum in float32; the
choice changes nothing but rounding. Other devices take `F.linear`.

Compiled (gemma.model.static_decode), a single-row product is a multiply and a sum, which Inductor turns into one
vectorised loop over the weight, faster than either kernel on both kinds of CPU measured. Its input must then be a
tensor of its own (`fresh`), which each layer makes once for the products that share it.
"""

from __future__ import annotations

import os
import time

import torch
import torch.nn.functional as F

KERNELS = ("mv", "linear")
_chosen: dict[tuple, str] = {}  # (rows, cols, dtype) -> the kernel measured fastest on this machine


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weight.T without bias; a single input row without autograd or autocast (whose rules are written for the
    matmul ops) goes through the fastest kernel for one row (see the module's note)."""
    if x.numel() == weight.shape[1] and not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type):
        if torch.compiler.is_compiling():
            # A multiply and a sum in float32, as the library's kernels sum. The caller has made x a tensor of
            # its own where it is computed (`fresh`), or it would be computed again for every row of the weight.
            out = (weight.float() * x.reshape(1, -1).float()).sum(-1).to(x.dtype)
            return out.view(*x.shape[:-1], weight.shape[0])
        if x.device.type == "cpu" and kernel_for(weight) == "mv":
            return torch.mv(weight, x.reshape(-1)).view(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight)


def fresh(x: torch.Tensor, *consumers) -> torch.Tensor:
    """x, in a compiled single-row step, as a tensor of its own (`materialize`): what a layer calls once on an
    input that it feeds to `linear` and that elementwise work produced (a norm, an activation), so that the work is
    done once, not inside the loop over every row of the weight. Elsewhere x itself; x itself too where none of
    the `consumers` named (the layers x goes to) multiplies by a plain `weight` through `linear`: a quantized
    layer's kernel reads its input from memory anyway (gemma.model.quantize)."""
    if consumers and not any(isinstance(getattr(c, "weight", None), torch.Tensor) for c in consumers):
        return x
    if torch.compiler.is_compiling() and x.numel() == x.shape[-1] and not torch.is_grad_enabled():
        return materialize(x)
    return x


def kernel_for(weight: torch.Tensor) -> str:
    """'mv' or 'linear': the kernel that multiplies one row by `weight` fastest here (measured once per shape)."""
    key = (*weight.shape, weight.dtype)
    kernel = _chosen.get(key)
    if kernel is None:
        kernel = _chosen[key] = os.environ.get("GEMMA_MATVEC") or _measure(weight)
        if kernel not in KERNELS:
            kernel = _chosen[key] = _measure(weight)
    return kernel


def _measure(weight: torch.Tensor, reps: int = 3) -> str:
    x = torch.zeros(1, weight.shape[1], dtype=weight.dtype)
    runs = {"mv": lambda: torch.mv(weight, x[0]), "linear": lambda: F.linear(x, weight)}
    best = {}
    for name, run in runs.items():
        run()  # warm: the weight in cache as far as it fits, the kernel's set-up done
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        best[name] = min(times)
    return min(best, key=best.get)


def chosen() -> dict[str, str]:
    """The kernels chosen so far, as 'rows x cols dtype' -> kernel (for reports)."""
    return {f"{n} x {k} {str(dt).removeprefix('torch.')}": kernel for (n, k, dt), kernel in _chosen.items()}


@torch.library.custom_op("gemma::materialize", mutates_args=())
def materialize(x: torch.Tensor) -> torch.Tensor:
    """x, as a tensor of its own: an opaque copy that keeps torch.compile from inlining the work that makes a
    single-row product's input (a norm, say) into the loop over the weight's rows, which would redo it for every
    row (twice the output head's time in a compiled step)."""
    return x.clone()


@materialize.register_fake
def _(x):
    return torch.empty_like(x)
