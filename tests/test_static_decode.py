"""gemma.model.static_decode: the fixed-shape decoding step computes what the eager step computes, eagerly and under
torch.compile; generation, the serving engine and a failed compile with it; gemma.model.matvec's kernel choice."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import gemma.model.static_decode as static_decode
from gemma.formats.checkpoint import build_model, load_hf_folder
from gemma.generation.batch import generate, left_pad
from gemma.generation.engine import Engine
from gemma.generation.steps import decode_one_token, prefill
from gemma.model import matvec
from gemma.model.compiled import compile_model, uncompile_model
from gemma.model.static_decode import DecodeStep
from gen_models import tiny_generator
from tiny_models import CASES, hf_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    out = {}
    for case in CASES:
        folder = tmp_path_factory.mktemp(case)
        hf_model(case).save_pretrained(folder)
        out[case] = build_model(*load_hf_folder(folder)).eval()
    return out


def steps(model, stepper, prompts, n):
    """The logits (n, B, V) of n greedy steps after a left-padded prefill, each step through `stepper`."""
    tokens, positions = left_pad(prompts, 0)
    cache = model.new_cache(len(prompts), tokens.shape[1] + n)
    out = []
    with torch.no_grad():
        logits = prefill(model, cache, tokens, positions)
        nxt = positions[:, -1] + 1
        for i in range(n):
            logits = stepper(cache, logits.argmax(-1), nxt + i)
            out.append(logits)
    return torch.stack(out)


PROMPTS = [[5, 6, 7, 8], [9, 10]]  # rows of different lengths (left padding); 12 steps wrap the 5-token windows


@pytest.mark.parametrize("case", CASES)
def test_the_static_step_equals_the_eager_step(models, case):
    model = models[case]
    want = steps(model, lambda c, t, p: decode_one_token(model, c, t, p), PROMPTS, 12)
    got = steps(model, DecodeStep(model, compile=False), PROMPTS, 12)
    # Attending over every slot, the filled ones and the masked rest, the attention kernels block their float32
    # sums differently (a few ulps).
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_the_static_step_refuses_a_full_cache(models):
    model = models["gemma3"]
    cache = model.new_cache(1, 3)
    with torch.no_grad():
        prefill(model, cache, torch.tensor([[5, 6, 7]]), torch.arange(3)[None])
    with pytest.raises(Exception, match="exceeds the cache"):
        DecodeStep(model, compile=False)(cache, torch.tensor([1]), torch.tensor([3]))


@pytest.mark.slow  # torch.compile of tiny models, ~10 s each here
@pytest.mark.parametrize("case", ["gemma2", "gemma3"])
def test_the_compiled_step_matches_the_eager_one_for_any_cache_length(models, case):
    model = models[case]
    step = DecodeStep(model)
    want = steps(model, lambda c, t, p: decode_one_token(model, c, t, p), PROMPTS, 12)
    got = steps(model, step.step, PROMPTS, 12)
    assert not step.failed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # fused float32 loops: rounding, not bits
    frames = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    longer = steps(model, step.step, PROMPTS, 20)  # a cache of another length: the same graph
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == frames
    torch.testing.assert_close(longer[:12], want, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_the_compiled_int8_step_matches_the_eager_int8_one(models):
    from gemma.model.quantize import quantize_model

    model = quantize_model(copy.deepcopy(models["gemma3"]))
    step = DecodeStep(model)
    want = steps(model, lambda c, t, p: decode_one_token(model, c, t, p), PROMPTS, 12)
    got = steps(model, step.step, PROMPTS, 12)
    assert not step.failed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the int8 kernel's float32 sums, in another order


@pytest.mark.slow
def test_a_compiled_model_generates_and_serves_as_the_eager_one(tok, tmp_path):
    model = tiny_generator("gemma3", tok, tmp_path).eval()
    prompts = [[tok.bos_id, 50, 60, 70], [tok.bos_id, 80]]
    want = generate(model, tok, prompts, max_new_tokens=16, stop_ids=())
    fast = compile_model(copy.deepcopy(model))
    assert generate(fast, tok, prompts, max_new_tokens=16, stop_ids=()) == want
    with Engine(fast, tok, max_batch=4) as engine:  # rows join and leave: the step's batch changes
        requests = [engine.submit(p, max_new_tokens=16, stop_ids=()) for p in prompts]
        assert [list(r.result(120).token_ids) for r in requests] == want
    assert not fast.decode_step.failed
    assert uncompile_model(fast).decode_step is None


@pytest.mark.slow
def test_guards_skipped_after_the_first_call_and_checked_again_where_a_graph_would_not_fit(models, monkeypatch):
    """A signature's later calls skip torch.compile's guards; a call that would need another graph under the same
    signature (here every call shares one, so that a cache of another class needs a second graph) is refused by
    torch.compile before it runs, and runs again under checked guards, still compiled and right."""
    from gemma.model.kv_cache import KVCache

    class OtherCache(KVCache):
        pass

    model = models["gemma3"]
    monkeypatch.setattr(static_decode, "_signature", lambda cache, token: "one")
    step = DecodeStep(model)
    eager = lambda c, t, p: decode_one_token(model, c, t, p)  # noqa: E731
    want = steps(model, eager, PROMPTS, 6)
    torch.testing.assert_close(steps(model, step.step, PROMPTS, 6), want, atol=1e-5, rtol=1e-5)
    assert step.warm == {"one": True}
    plain = model.new_cache

    def other(*args, **kwargs):
        cache = plain(*args, **kwargs)
        cache.__class__ = OtherCache
        return cache

    monkeypatch.setattr(model, "new_cache", other)
    torch.testing.assert_close(steps(model, step.step, PROMPTS, 6), want, atol=1e-5, rtol=1e-5)
    assert step.warm == {"one": False} and not step.failed


def test_a_failed_compile_runs_the_eager_step_and_says_so_once(models, monkeypatch, capsys):
    def broken(fn, **kw):
        def run(*args):
            raise RuntimeError("no C++ compiler found\nmore detail")

        return run

    monkeypatch.setattr(static_decode.torch, "compile", broken)
    model = models["gemma3"]
    step = DecodeStep(model)
    want = steps(model, lambda c, t, p: decode_one_token(model, c, t, p), PROMPTS, 6)
    assert torch.equal(steps(model, step.step, PROMPTS, 6), want)
    assert step.failed
    notes = [line for line in capsys.readouterr().err.splitlines() if "torch.compile" in line]
    assert notes == [
        "note: torch.compile of the decoding step failed (RuntimeError: no C++ compiler found); running it uncompiled"
    ]


@pytest.mark.parametrize("kernel", matvec.KERNELS)
def test_each_single_row_kernel_is_the_same_product(monkeypatch, kernel):
    monkeypatch.setattr(matvec, "_chosen", {})
    monkeypatch.setenv("GEMMA_MATVEC", kernel)
    w, x = torch.randn(300, 64), torch.randn(1, 1, 64)
    with torch.no_grad():
        got = matvec.linear(x, w)
    assert matvec.chosen() == {"300 x 64 float32": kernel}
    torch.testing.assert_close(got, F.linear(x, w), atol=1e-5, rtol=1e-5)


def test_the_single_row_kernel_is_measured_once_per_shape(monkeypatch):
    monkeypatch.setattr(matvec, "_chosen", {})
    monkeypatch.delenv("GEMMA_MATVEC", raising=False)
    calls = []
    measure = matvec._measure
    monkeypatch.setattr(matvec, "_measure", lambda w: calls.append(tuple(w.shape)) or measure(w))
    w = torch.randn(256, 32, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in range(3):
            matvec.linear(torch.randn(1, 32, dtype=torch.bfloat16), w)
        matvec.linear(torch.randn(4, 32, dtype=torch.bfloat16), w)  # several rows: the general kernel, no choice
    assert calls == [(256, 32)]
    assert matvec.chosen()["256 x 32 bfloat16"] in matvec.KERNELS
