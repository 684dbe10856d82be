"""gemma.model.int4: 4-bit weights with a scale and zero per 32 columns. The values round to nearest for the scale and
zero the kernel uses; our reading of the kernel's packed layout inverts PyTorch's converter; the kernel's product
equals the float product of the dequantized weight; a model quantized to int4 stays near the float one and generates
through gemma.load, chat.py and the compiled decode step."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemma
from gemma.generation.batch import generate
from gemma.generation.steps import decode_one_token
from gemma.model.int4 import (
    GROUP,
    Int4Embedding,
    Int4Linear,
    Int4Weight,
    dequantize,
    pack,
    quantize_groups,
    unpack_rows,
)
from gemma.model.layers import Linear
from gemma.model.quantize import quantize_model
from gemma.model.static_decode import DecodeStep
from gen_models import tiny_generator, tiny_generator_folder
from tiny_models import CASES

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_groups_round_to_nearest_for_the_stored_scale_and_zero(dtype):
    torch.manual_seed(0)
    w = torch.randn(40, 4 * GROUP) * torch.logspace(-3, 1, 40)[:, None]  # rows of very different ranges
    w[5] = 0.0  # an all-zero row must not divide by zero
    w[6, :GROUP] = 0.25  # nor a constant group
    q, sz = quantize_groups(w, dtype)
    assert q.dtype == torch.uint8 and int(q.max()) <= 15 and sz.dtype == dtype and sz.shape == (40, 4, 2)
    back = dequantize(q, sz)
    scale = sz[..., 0].float().repeat_interleave(GROUP, 1)
    # each value is the nearest of the 16 levels (q - 8) * scale + zero that the stored scale and zero give
    levels = (torch.arange(16).float() - 8)[None, None, :] * scale[..., None] + sz[..., 1].float().repeat_interleave(
        GROUP, 1
    )[..., None]
    nearest = (levels - w[..., None]).abs().amin(-1)
    assert torch.allclose((back - w).abs(), nearest, atol=1e-6 * float(w.abs().max()))
    assert torch.equal(back[5], torch.zeros(4 * GROUP)) and torch.allclose(back[6, :GROUP], w[6, :GROUP])
    # the levels span each group's range: its extremes are within half a step (plus the scale's rounding)
    assert ((back - w).abs() <= scale * (0.5 + 0.02) + 1e-30).all()


def test_our_reading_of_the_packed_layout_inverts_the_converter():
    torch.manual_seed(0)
    q = torch.randint(0, 16, (192, 96), dtype=torch.uint8)
    packed = pack(q)
    assert packed.shape == (192, 48) and packed.dtype == torch.uint8
    rows = torch.tensor([[0, 31, 32, 63], [64, 100, 150, 191]])
    assert torch.equal(unpack_rows(packed, rows, 96), q[rows])
    assert torch.equal(unpack_rows(packed, torch.arange(192), 96), q)


@pytest.mark.parametrize("shape", [(128, 64), (96, 96), (48, 48)])  # the last two are padded (rows, columns)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5])
def test_the_int4_product_equals_the_dequantized_one(shape, dtype, rows):
    torch.manual_seed(0)
    N, K = shape
    weight = Int4Weight(torch.randn(N, K).to(dtype))
    w = weight.rows(torch.arange(N)).float()
    assert w.shape == (N, K)
    x = torch.randn(2, rows, K).to(dtype)
    want = x.float() @ w.T
    got = weight.matmul(x)
    assert got.shape == (2, rows, N) and got.dtype == dtype
    # float32: summation order only. bf16: the kernel rounds its output to bf16 (and our rows are rounded to bf16)
    tol = 1e-5 * float(want.abs().max()) if dtype == torch.float32 else 2e-2 * float(want.abs().max())
    assert (got.float() - want).abs().max() <= tol


def test_the_int4_embedding_looks_up_the_rows_its_head_multiplies_by():
    torch.manual_seed(0)
    table = torch.randn(256, 64)
    embed = Int4Embedding(table)
    tokens = torch.tensor([[3, 200, 3], [255, 0, 64]])
    rows = embed(tokens)
    assert rows.shape == (2, 3, 64) and rows.dtype == torch.float32
    whole = embed(torch.arange(256))
    assert torch.equal(rows, whole[tokens])
    assert float((whole - table).norm() / table.norm()) < 0.1  # 4 bits a value: about 8% for Gaussian weights
    h = torch.randn(4, 64)
    torch.testing.assert_close(embed.project(h), h @ whole.T, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_an_int4_model_is_the_float_model_of_its_dequantized_weights(case, tok, tmp_path):
    torch.manual_seed(0)
    model = tiny_generator(case, tok, tmp_path).eval()
    ids = torch.randint(3, tok.vocab_size, (2, 16))
    prompt = [tok.bos_id, *tok.encode("The quick brown fox", bos=False)]
    with torch.no_grad():
        want = model(ids)
        float_model = copy.deepcopy(model)
        quantize_model(model, "int4")
        got = model(ids)
        quantized_greedy = generate(model, tok, [prompt], max_new_tokens=12)[0]
        # the float model holding the int4 model's dequantized weights computes the same logits
        for name, m in model.named_modules():
            if isinstance(m, Int4Linear):
                float_model.get_submodule(name).weight.copy_(m.weight4.rows(torch.arange(m.out_features)))
        float_model.embed.weight.copy_(model.embed(torch.arange(model.embed.num_embeddings)))
        same = float_model(ids)
        same_greedy = generate(float_model, tok, [prompt], max_new_tokens=12)[0]
    projections = [m for block in model.layers for m in (*block.attn.children(), *block.mlp.children())]
    assert not any(isinstance(m, Linear) for m in projections)
    assert isinstance(model.embed, Int4Embedding) and model.quantized == "int4"
    if model.config.num_experts or model.config.per_layer_input_size:  # Gemma 4's router and per-layer ones stay
        assert all(isinstance(b.moe.router, Linear) and isinstance(b.ple_gate, Linear) for b in model.layers)
    torch.testing.assert_close(got, same, atol=1e-5, rtol=1e-5)  # the kernel's float32 sums, in another order
    # On these tiny random models 4-bit rounding moves the logits by 0.32-0.42 of their size (0.60 with experts:
    # flipped expert choices), against 0.16 on the real 270M, whose greedy agreement the bench reports.
    assert float((got - want).norm() / want.norm()) < (0.7 if model.config.num_experts else 0.5)
    assert quantized_greedy == same_greedy


@pytest.mark.slow
def test_the_compiled_int4_step_matches_the_eager_int4_one(tok, tmp_path):
    from test_static_decode import PROMPTS, steps

    model = quantize_model(tiny_generator("gemma3", tok, tmp_path).eval(), "int4")
    step = DecodeStep(model)
    want = steps(model, lambda c, t, p: decode_one_token(model, c, t, p), PROMPTS, 12)
    got = steps(model, step.step, PROMPTS, 12)
    assert not step.failed
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)  # the same kernel; the elementwise work fused


def test_load_and_chat_quantize_to_int4(tok, tmp_path):
    folder = tiny_generator_folder("gemma3", tok, tmp_path / "m")
    model, _ = gemma.load(folder, quantize="int4")
    assert model.quantized == "int4"
    expected = quantize_model(gemma.load(folder)[0], "int4")
    ids = torch.randint(3, tok.vocab_size, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), expected(ids))
    cmd = [sys.executable, str(ROOT / "tools" / "chat.py"), "--model", str(folder), "--dtype", "bf16", "--quantize"]
    r = subprocess.run(
        [*cmd, "int4", "--prompt", "Hello", "--max-new-tokens", "8"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0 and r.stdout.strip(), r.stderr
