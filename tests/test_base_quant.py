"""gemma.model.base_quant: NF4 equals bitsandbytes bit for bit (levels, the double-quantization map, packed
indices, absmax, dequantized weights); LoRA over an NF4 or int8 base computes exactly what it computes over the
dequantized base, forward and backward; its adapter loads in peft over bitsandbytes' own NF4 base of the same model;
`train.sft --base-quant` trains end to end."""

from __future__ import annotations

import contextlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gemma
import lora
from gemma.formats.checkpoint import build_model, load_hf_folder
from gemma.model.base_quant import (
    NF4_LEVELS,
    Int8Weight,
    NF4Weight,
    QuantLinear,
    dynamic_map,
    quantize_base,
)
from gemma.model.quantize import quantize_rows
from lora.layer import LoRALinear
from tiny_models import hf_model, tokens

ROOT = Path(__file__).resolve().parents[1]
ARITH = ROOT / "examples" / "arith_train.jsonl"
SHAPES = [
    ((7, 9), torch.float32),
    ((64, 64), torch.float32),
    ((1000, 333), torch.float32),
    ((640, 2048), torch.bfloat16),
]


@pytest.fixture(scope="module")
def bnb():
    bnb = pytest.importorskip("bitsandbytes")
    return bnb


@contextlib.contextmanager
def bnb_pytorch_blockwise(bnb):
    """bitsandbytes with its blockwise 8-bit quantizer (the double-quantization step) on its PyTorch kernel: its
    compiled CPU kernel searches the map approximately and picks the farther level for a few values in ten
    thousand (see base_quant's docstring)."""
    F = bnb.functional
    op = torch.ops.bitsandbytes.quantize_blockwise.default
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)

    def blockwise(A, code=None, absmax=None, out=None, blocksize=4096, nested=False):
        code = F.create_dynamic_map().to(A.device) if code is None else code
        q, am = op.redispatch(keys, A, code, blocksize)
        return q, F.QuantState(absmax=am, code=code, blocksize=blocksize, dtype=A.dtype)

    saved, F.quantize_blockwise = F.quantize_blockwise, blockwise
    try:
        yield
    finally:
        F.quantize_blockwise = saved


def bnb_quantize_4bit(bnb, weight: torch.Tensor, double_quant: bool):
    with bnb_pytorch_blockwise(bnb):
        return bnb.functional.quantize_4bit(weight, blocksize=64, quant_type="nf4", compress_statistics=double_quant)


def test_the_tables_are_bitsandbytes(bnb):
    assert torch.equal(torch.tensor(NF4_LEVELS), bnb.functional.get_4bit_type("nf4", device="cpu"))
    assert torch.equal(dynamic_map(), bnb.functional.create_dynamic_map(signed=True))


@pytest.mark.parametrize("double_quant", [False, True])
@pytest.mark.parametrize("shape, dtype", SHAPES)
def test_nf4_equals_bitsandbytes_bit_for_bit(bnb, shape, dtype, double_quant):
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(shape[0])).to(dtype)
    packed, state = bnb_quantize_4bit(bnb, weight, double_quant)
    ours = NF4Weight(weight, double_quant=double_quant)
    assert torch.equal(ours.packed, packed.reshape(-1))
    if double_quant:
        assert torch.equal(ours.absmax_q, state.absmax) and torch.equal(ours.offset, state.offset)
        assert torch.equal(ours.absmax2, state.state2.absmax)
    else:
        assert torch.equal(ours.absmax, state.absmax)
    # bitsandbytes' PyTorch kernel; its compiled CPU kernel agrees where each row is whole blocks (every Gemma
    # projection: widths are multiples of 64) and dequantizes other shapes wrongly (64 x 96: errors 4x ours).
    keys = torch._C.DispatchKeySet(torch._C.DispatchKey.CompositeExplicitAutograd)
    absmax = state.absmax
    if double_quant:
        absmax = bnb.functional.dequantize_blockwise(state.absmax, state.state2) + state.offset
    reference = torch.ops.bitsandbytes.dequantize_4bit.default.redispatch(
        keys, packed, absmax, 64, "nf4", list(shape), torch.float32
    )
    assert torch.equal(ours.dequantize(), reference.to(dtype))
    if shape[1] % 64 == 0:
        assert torch.equal(ours.dequantize(), bnb.functional.dequantize_4bit(packed, state).to(dtype))


def test_nf4_round_trip_error_is_within_half_a_level_step():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    levels = torch.tensor(NF4_LEVELS)
    widest = (levels[1:] - levels[:-1]).max()
    true = weight.view(-1, 64).abs().amax(dim=1)
    for double_quant in (False, True):
        q = NF4Weight(weight, double_quant=double_quant)
        stored = q.block_absmax()  # the 8-bit absmax under double quantization moves each block's scale a little
        assert (stored - true).abs().max() < 0.01 * true.max()
        error = (q.dequantize() - weight).abs().view(-1, 64).amax(dim=1)
        assert (error <= widest / 2 * true + (stored - true).abs() + 1e-6).all()
        assert q.packed.numel() == weight.numel() // 2 and q.packed.dtype == torch.uint8


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_rows_and_sliced_dequantization_are_the_whole_dequantization(monkeypatch, mode):
    import gemma.model.base_quant as base_quant

    weight = torch.randn(300, 128, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    q = base_quant.quantized_weight(weight, mode)
    whole = q.dequantize()
    monkeypatch.setattr(base_quant, "DEQUANT_VALUES", 200)  # several slices, the last one short
    assert torch.equal(q.dequantize(), whole) and torch.equal(q.dequantize(torch.float32).bfloat16(), whole)
    sliced = base_quant.quantized_weight(weight, mode)  # quantized a slice at a time too
    assert all(torch.equal(a, b) for a, b in zip(sliced.state_dict().values(), q.state_dict().values()))
    index = torch.tensor([[0, 299, 7], [7, 150, 1]])
    assert torch.equal(q.rows(index), whole[index])


def test_int8_is_per_row_round_to_nearest():
    weight = torch.randn(96, 200, generator=torch.Generator().manual_seed(1))
    q = Int8Weight(weight)
    ref_q, ref_scale = quantize_rows(weight)
    assert torch.equal(q.q, ref_q) and torch.equal(q.scale, ref_scale)
    assert ((q.dequantize() - weight).abs() <= q.scale[:, None] / 2 * (1 + 1e-6)).all()


# ---- LoRA over a quantized base --------------------------------------------------------------------------------------


def lora_model(tmp_path: Path, dtype=torch.float32):
    hf_model("gemma3").save_pretrained(tmp_path)
    cfg, state = load_hf_folder(tmp_path, dtype)
    model = build_model(cfg, state, "cpu")
    torch.manual_seed(0)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0, targets=("q", "v", "down")))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
            if p.requires_grad:
                p.data = p.data.float()
    return model


def dequantized_copy(model):
    """The same model with each quantized weight replaced by its dequantized tensor (the reference)."""
    import copy

    from gemma.model.layers import Linear

    from gemma.model.base_quant import QuantEmbedding
    from gemma.model.layers import Embedding

    ref = copy.deepcopy(model)
    if isinstance(ref.embed, QuantEmbedding):
        table = ref.embed.table.dequantize()
        ref.embed = Embedding(*table.shape).to(table.dtype)
        ref.embed.weight = torch.nn.Parameter(table, requires_grad=False)
    for block in ref.layers:
        for module in (block.attn, block.mlp):
            for name, child in list(module.named_children()):
                if isinstance(child, LoRALinear):
                    w = child.weight.dequantize()
                    del child.weight
                    child.weight = torch.nn.Parameter(w, requires_grad=False)
                elif isinstance(child, QuantLinear):
                    plain = Linear(child.in_features, child.out_features).to(child.weight.dtype)
                    plain.weight = torch.nn.Parameter(child.weight.dequantize(), requires_grad=False)
                    setattr(module, name, plain)
    return ref


def adapter_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("embed", [False, True], ids=["", "embed"])
@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_lora_over_a_quantized_base_is_lora_over_its_dequantized_weights(tmp_path, mode, precision, embed):
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    model = quantize_base(lora_model(tmp_path, dtype), mode, embed=embed)
    assert model.base_quant == mode
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == 4 * model.config.num_layers  # k o gate up
    ref = dequantized_copy(model)
    x = tokens(2, 12)
    results = []
    for m in (model, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = m(x)
        logits.float().square().mean().backward()
        results.append((logits.detach(), adapter_grads(m)))
    (a, ga), (b, gb) = results
    assert torch.equal(a, b)
    assert ga.keys() == gb.keys() and all(torch.equal(ga[k], gb[k]) for k in ga)
    # The training loss (the chunked head over the tied table) too.
    from train.loss import chunked_cross_entropy

    targets = torch.cat([x[:, 1:], torch.full((2, 1), -100)], dim=1)
    losses = []
    for m in (model, ref):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss, _ = chunked_cross_entropy(m, m.hidden_states(x), targets, chunk=7)
        losses.append(loss.detach())
    assert torch.equal(*losses)


def test_nf4_logits_stay_near_the_unquantized_base(tmp_path):
    full = lora_model(tmp_path / "a")
    nf4 = quantize_base(lora_model(tmp_path / "b"), "nf4")
    int8 = quantize_base(lora_model(tmp_path / "c"), "int8")
    x = tokens(2, 12)
    with torch.no_grad():
        ref = full(x)
        spread = ref.std()
        # On this tiny random model (Gaussian weights, no trained structure) 4 bits a weight move the logits by 8.5%
        # of their spread on average, int8 by 0.6%; the real 270M's figures are in the slow test below.
        nf4_error, int8_error = (nf4(x) - ref).abs().mean() / spread, (int8(x) - ref).abs().mean() / spread
        assert nf4_error < 0.12 and int8_error < 0.01 and int8_error < nf4_error / 5, (nf4_error, int8_error)


def test_a_quantized_base_refuses_an_in_place_merge_and_a_second_quantization(tmp_path):
    model = quantize_base(lora_model(tmp_path), "nf4")
    with pytest.raises(gemma.GemmaError, match="cannot merge a LoRA update into a quantized base"):
        lora.merge(model)
    with pytest.raises(gemma.GemmaError, match="unknown base quantization 'nf2'"):
        quantize_base(lora_model(tmp_path / "x"), "nf2")


def test_load_with_quantize_nf4_keeps_an_adapter_unmerged_over_the_nf4_base(tiny_folder, tmp_path):
    model, _ = gemma.load(tiny_folder)
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    lora.save_adapter(model, tmp_path / "adapter")
    ours, _ = gemma.load(tiny_folder, adapter=tmp_path / "adapter", quantize="nf4")
    layers = lora.lora_layers(ours)
    assert layers and all(layer.quantized and not layer.merged for layer in layers.values())
    reference = quantize_base(gemma.load(tiny_folder, adapter=tmp_path / "adapter")[0], "nf4")
    x = tokens(2, 12)
    with torch.no_grad():
        assert torch.equal(ours(x), reference(x))


def test_chat_runs_over_an_nf4_base(tiny_folder):
    run = subprocess.run(
        [sys.executable, "tools/chat.py", "--model", str(tiny_folder), "--quantize", "nf4", "--prompt", "hi"]
        + ["--max-new-tokens", "4", "--temperature", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert run.returncode == 0, run.stderr[-2000:]


# ---- peft over bitsandbytes' NF4 base ------------------------------------------------------------------------------


def test_our_qlora_adapter_loads_in_peft_over_bitsandbytes_nf4(bnb, tmp_path):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    # MLP width 128, not the tiny model's 96: bitsandbytes' CPU kernel needs whole blocks of 64 in a row (above).
    hf_model("gemma3", intermediate_size=128).save_pretrained(tmp_path / "base")
    ours = build_model(*load_hf_folder(tmp_path / "base", torch.float32), "cpu")
    lora.inject(ours, lora.LoraConfig(r=4, alpha=8, dropout=0.0))
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(hash(name) % 1000))
    quantize_base(ours, "nf4")
    lora.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    config = transformers.BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32,
    )
    with bnb_pytorch_blockwise(bnb):
        base = transformers.AutoModelForCausalLM.from_pretrained(
            tmp_path / "base", quantization_config=config, device_map="cpu", attn_implementation="eager"
        )
    for module in base.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            # Its avx512-bf16 CPU path repacks the weight with bf16 absmax; the plain path dequantizes exactly, as
            # on every other CPU and on GPUs.
            module.support_avx512bf16_for_cpu = False
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = tokens(2, 12)
    with torch.no_grad():
        got, expected = ours(x), theirs(x).logits.float()
    # The same NF4 weights, dequantized alike: what differs is the attention paths' float32 rounding.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


# ---- the command ---------------------------------------------------------------------------------------------------


def sft(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "train.sft", *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True
    )


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_sft_trains_over_a_quantized_base(tiny_folder, tmp_path, mode):
    run = sft("--model", tiny_folder, "--data", ARITH, "--max-steps", 3, "--base-quant", mode, "--out", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    assert '"base_quant": "' + mode + '"' in (tmp_path / "config.json").read_text()


def test_fp16_over_an_nf4_base_trains_gemma_2(tiny_gemma2_folder, tmp_path):
    # fp16 is refused for Gemma 3 and later whatever the base (their activations overflow it); for Gemma 1 and 2 an
    # NF4 base is as safe in fp16 as a bf16 one: its dequantized values are the weights' own range.
    flags = ["--precision", "fp16", "--base-quant", "nf4", "--max-steps", 3]
    run = sft("--model", tiny_gemma2_folder, "--data", ARITH, *flags, "--out", tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    losses = [json.loads(line)["loss"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_sft_trains_over_a_quantized_embedding_too(tiny_folder, tmp_path):
    flags = ["--base-quant", "nf4", "--base-quant-embed", "--max-steps", 2]
    run = sft("--model", tiny_folder, "--data", ARITH, *flags, "--out", tmp_path / "run")
    assert run.returncode == 0, run.stderr[-2000:]
    alone = sft("--model", tiny_folder, "--data", ARITH, "--base-quant-embed", "--out", tmp_path / "bad")
    assert alone.returncode == 2
    assert alone.stderr.strip().splitlines()[-1] == "error: --base-quant-embed needs --base-quant"


def test_sft_refuses_an_unknown_base_quant(tiny_folder, tmp_path):
    run = sft("--model", tiny_folder, "--data", ARITH, "--base-quant", "nf2", "--out", tmp_path / "run")
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("error: argument --base-quant: invalid choice: 'nf2'")
