"""gemma.model.compiled: torch.compile of a prompt's elementwise work agrees with the eager model, and falls back."""

from __future__ import annotations

import copy

import pytest
import torch

import gemma.model.compiled
from gemma.formats.checkpoint import build_model, load_hf_folder
from gemma.model.compiled import compile_model, uncompile_model
from gemma.generation.steps import prefill
from tiny_models import hf_model, tokens


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("gemma3")
    hf_model("gemma3").save_pretrained(folder)  # q/k norms, sliding layers, sandwich norms: every compiled kernel
    return build_model(*load_hf_folder(folder)).eval()


def test_compiled_prompt_pass_matches_eager(model):
    x = tokens(batch=2, length=12, seed=3)
    fast = compile_model(copy.deepcopy(model))
    with torch.no_grad():
        want = model(x)
        got = fast(x)
        # Prefill into a cache too (the path generation takes), then one eager decoding step from it.
        c1, c2 = model.new_cache(2, 16), fast.new_cache(2, 16)
        pos = torch.arange(12).expand(2, -1)
        torch.testing.assert_close(prefill(fast, c2, x, pos), prefill(model, c1, x, pos), atol=1e-5, rtol=1e-5)
        nxt = torch.tensor([5, 7])
        step = lambda m, c: m(nxt[:, None], torch.tensor([[12], [12]]), cache=c)  # noqa: E731
        torch.testing.assert_close(step(fast, c2), step(model, c1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fused loops: float32 rounding, not bits
    # Training (autograd on) stays on the eager ops, bit for bit.
    with torch.enable_grad():
        assert torch.equal(fast(x), model(x))
    assert torch.equal(uncompile_model(fast)(x), model(x))


def test_a_failed_compile_runs_eagerly_and_says_so_once(model, monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(gemma.model.compiled.torch, "compile", broken)
    fast = compile_model(copy.deepcopy(model))
    x = tokens(batch=1, length=9, seed=4)
    with torch.no_grad():
        assert torch.equal(fast(x), model(x))
        assert torch.equal(fast(x), model(x))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "torch.compile failed" in line]
    assert len(lines) == 3  # one per kernel (RMSNorm, RoPE, GeGLU), each once
    assert all("RuntimeError: no C++ compiler found); running uncompiled" in line for line in lines)


def test_bad_input_is_the_eager_error_and_compiling_goes_on(model):
    kernel = compile_model(copy.deepcopy(model)).layers[0].mlp.kernels.gelu_mul
    with torch.no_grad():
        with pytest.raises(RuntimeError, match="size of tensor"):  # the eager op's own message
            kernel(torch.zeros(1, 3, 4), torch.zeros(1, 3, 5))
        assert not kernel.failed
        g, u = torch.randn(1, 3, 4), torch.randn(1, 3, 4)
        torch.testing.assert_close(kernel(g, u), torch.nn.functional.gelu(g, approximate="tanh") * u)
        assert not kernel.failed
