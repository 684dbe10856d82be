"""lora/: the layer, injection, exact merging and PEFT-format adapters, against peft on tiny models of each generation.

peft adapters are made with `init_lora_weights=False` (B not zero) and, for DoRA, a perturbed magnitude (otherwise
DoRA's output equals plain LoRA's and the magnitude would go untested).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

import gemma
import lora
from gemma.errors import GemmaError
from lora.io import peft_names
from tiny_models import hf_model, tokens

peft = pytest.importorskip("peft")

ROOT = Path(__file__).resolve().parents[1]
CASES = ("gemma1-mqa", "gemma1-mha", "gemma2", "gemma3")
VARIANTS = {"plain": {}, "rslora": {"use_rslora": True}, "dora": {"use_dora": True}}
HF_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
R, ALPHA = 4, 6  # alpha / r != 1 and alpha / sqrt(r) != alpha / r, so a wrong scale shows


# ---- helpers -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def base(tmp_path_factory, tiny_tokenizer_path):
    """case -> an HF folder of hf_model(case) with a tokenizer, built once per module."""
    folders = {}

    def get(case: str) -> Path:
        if case not in folders:
            folder = tmp_path_factory.mktemp(case)
            hf_model(case).save_pretrained(folder)
            shutil.copy(tiny_tokenizer_path, folder / "tokenizer.model")
            folders[case] = folder
        return folders[case]

    return get


def peft_model(case: str, variant: str, targets=HF_TARGETS, seed: int = 1, dropout: float = 0.0, **extra):
    """hf_model(case) wrapped by peft with random (non-zero) A and B; DoRA's magnitude moved off its init."""
    model = hf_model(case)
    torch.manual_seed(seed)
    cfg = peft.LoraConfig(
        r=R,
        lora_alpha=ALPHA,
        lora_dropout=dropout,
        target_modules=list(targets),
        init_lora_weights=False,
        task_type="CAUSAL_LM",
        **VARIANTS[variant],
        **extra,
    )
    model = peft.get_peft_model(model, cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    return model.eval()


def peft_adapter(case: str, variant: str, folder: Path, **kw) -> tuple[Path, object]:
    model = peft_model(case, variant, **kw)
    model.save_pretrained(folder)
    return folder, model


def randomize(model: torch.nn.Module, seed: int = 2) -> None:
    """Move our freshly injected adapter off its zero-update init."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora.lora_layers(model).values():
            layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=g) * 0.3)
            if layer.magnitude is not None:
                layer.magnitude.mul_(1 + 0.3 * torch.randn(layer.magnitude.shape, generator=g))


def peft_param(key: str) -> str:
    """peft's file key -> its parameter name in a live PeftModel (adapter name `default`)."""
    for suffix in ("lora_A.weight", "lora_B.weight"):
        if key.endswith(suffix):
            return key[: -len("weight")] + "default.weight"
    return key + ".default.weight"  # lora_magnitude_vector


def close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-5) -> None:
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def one_line_error(match: str):
    return pytest.raises(GemmaError, match=match)


# ---- parity with peft ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_with_equal_logits(case, variant, base, tmp_path):
    folder, theirs = peft_adapter(case, variant, tmp_path / "adapter")
    ours, _ = gemma.load(base(case), adapter=folder)
    assert len(lora.lora_layers(ours)) == 7 * ours.config.num_layers
    x = tokens()
    with torch.no_grad():
        expected = theirs(x).logits
        close(ours(x), expected)
        plain, _ = gemma.load(base(case))
        assert (plain(x) - expected).abs().max() > 1e-2  # the adapter matters


def test_peft_adapter_on_some_targets(base, tmp_path):
    folder, theirs = peft_adapter("gemma3", "dora", tmp_path / "adapter", targets=["q_proj", "v_proj", "down_proj"])
    ours, _ = gemma.load(base("gemma3"), adapter=folder)
    assert ours.lora_config.targets == ("q", "v", "down")
    assert set(lora.lora_layers(ours)) == {
        f"layers.{i}.{m}" for i in range(3) for m in ("attn.q", "attn.v", "mlp.down")
    }
    x = tokens()
    with torch.no_grad():
        close(ours(x), theirs(x).logits)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ("gemma1-mha", "gemma2", "gemma3"))
def test_our_adapter_loads_in_peft(case, variant, base, tmp_path):
    ours, _ = gemma.load(base(case))
    lora.inject(
        ours, lora.LoraConfig(r=R, alpha=ALPHA, **{k.removeprefix("use_"): v for k, v in VARIANTS[variant].items()})
    )
    randomize(ours)
    lora.save_adapter(ours, tmp_path / "adapter", base_model_name_or_path=str(base(case)))
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["r"] == R
    assert config["lora_alpha"] == ALPHA and sorted(config["target_modules"]) == sorted(HF_TARGETS)
    assert config["use_dora"] == (variant == "dora") and config["use_rslora"] == (variant == "rslora")
    theirs = peft.PeftModel.from_pretrained(hf_model(case), tmp_path / "adapter").eval()
    saved = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    live = dict(theirs.named_parameters())
    assert all(torch.equal(live[peft_param(k)], v) for k, v in saved.items())  # every tensor landed
    x = tokens()
    with torch.no_grad():
        close(ours(x), theirs(x).logits)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ("gemma1-mha", "gemma2", "gemma3"))
def test_forward_and_backward_match_peft(case, variant, base, tmp_path):
    folder, theirs = peft_adapter(case, variant, tmp_path / "adapter")
    ours, _ = gemma.load(base(case), adapter=folder)
    x = tokens()
    targets = torch.roll(x, -1, dims=1)
    for model, logits in ((ours, lambda: ours(x)), (theirs, lambda: theirs(x).logits)):
        model.zero_grad()
        F.cross_entropy(logits().flatten(0, 1), targets.flatten()).backward()
    live = dict(theirs.named_parameters())
    names = peft_names(ours.config, ours.lora_config)
    for name, p in ours.named_parameters():
        if name in names:
            assert p.grad is not None and p.grad.abs().max() > 0, name
            close(p.grad, live[peft_param(names[name])].grad)
        else:
            assert p.grad is None and not p.requires_grad, name  # the base stays frozen


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("case", ("gemma1-mha", "gemma2", "gemma3"))
def test_convert_with_adapter_equals_merge_and_unload(case, variant, base, tmp_path):
    from gemma.formats.convert import convert

    folder, theirs = peft_adapter(case, variant, tmp_path / "adapter")
    expected = theirs.merge_and_unload().state_dict()
    convert(base(case), tmp_path / "hf", "hf", adapter=folder)
    merged = load_file(tmp_path / "hf" / "model.safetensors")
    assert not any("lora" in k for k in merged)
    assert set(merged) == set(expected) - {"lm_head.weight"}
    for key, value in merged.items():
        close(value, expected[key])
    # The native output holds the same weights under native names.
    convert(base(case), tmp_path / "native", "native", adapter=folder)
    native, _ = gemma.load(tmp_path / "native")
    x = tokens()
    with torch.no_grad():
        close(native(x), theirs(x).logits)


@pytest.mark.parametrize("variant", ("plain", "dora"))
def test_training_dropout_matches_peft_under_the_same_seed(variant, base, tmp_path):
    # Both draw one dropout mask per LoRA layer in the same module order, so equal seeds give equal masks; DoRA's
    # base term must then see the dropped input too.
    folder, theirs = peft_adapter("gemma3", variant, tmp_path / "adapter", dropout=0.3)
    ours, _ = gemma.load(base("gemma3"), adapter=folder)
    assert ours.lora_config.dropout == 0.3
    x = tokens()
    with torch.no_grad():
        torch.manual_seed(5)
        expected = theirs.train()(x).logits
        torch.manual_seed(5)
        close(ours.train()(x), expected)
        assert (theirs.eval()(x).logits - expected).abs().max() > 1e-2  # dropout was active


# ---- merging -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_merge_unmerge_exact_and_idempotent(variant, base, tmp_path):
    folder, _ = peft_adapter("gemma3", variant, tmp_path / "adapter")
    model, _ = gemma.load(base("gemma3"), adapter=folder)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    with torch.no_grad():
        unmerged_out = model(x)
        lora.merge(model)
        once = {k: v.clone() for k, v in model.state_dict().items()}
        assert any(not torch.equal(once[k], before[k]) for k in before)
        close(model(x), unmerged_out)  # merged output equals unmerged output
        lora.merge(model)  # a second merge is a no-op
        assert all(torch.equal(v, once[k]) for k, v in model.state_dict().items())
        lora.unmerge(model)
        for k, v in model.state_dict().items():
            close(v, before[k], tol=1e-6)
        lora.unmerge(model)  # so is a second unmerge
        close(model(x), unmerged_out)


@pytest.mark.parametrize("variant", VARIANTS)
def test_merged_state_dict_is_pure_and_matches_in_place_merge(variant, base, tmp_path):
    folder, _ = peft_adapter("gemma2", variant, tmp_path / "adapter")
    model, _ = gemma.load(base("gemma2"))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cfg, adapter = lora.load_adapter(folder, model.config)
    adapter_copy = {k: v.clone() for k, v in adapter.items()}
    merged = lora.merged_state_dict(state, adapter, cfg)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())  # inputs untouched
    assert all(torch.equal(v, adapter_copy[k]) for k, v in adapter.items())
    assert merged.keys() == state.keys()
    lora.apply_adapter(model, folder, merge=True)
    in_place = model.state_dict()
    assert all(torch.equal(merged[k], in_place[k]) for k in merged)


def test_bf16_adapter_runs_and_merges_close_to_fp32(base, tmp_path):
    folder, _ = peft_adapter("gemma1-mha", "dora", tmp_path / "adapter")
    exact, _ = gemma.load(base("gemma1-mha"), adapter=folder)
    lora.merge(exact)
    half, _ = gemma.load(base("gemma1-mha"), adapter=folder, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in half.parameters())
    with torch.no_grad():
        unmerged = half(tokens())
        lora.merge(half)
        merged = half(tokens())
    assert (merged - unmerged).abs().max() <= 0.05 * unmerged.abs().max()
    ref = {k: v.to(torch.bfloat16) for k, v in exact.state_dict().items()}  # one rounding of the fp32 merge
    w = "layers.0.attn.q.weight"
    assert half.state_dict()[w].dtype == torch.bfloat16
    assert (half.state_dict()[w].float() - ref[w].float()).abs().max() <= ref[w].float().abs().max() / 64


# ---- the layer and injection ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("dora", (False, True))
def test_inject_init_freezes_base_and_keeps_weight_names(dora, base):
    model, _ = gemma.load(base("gemma2"))
    base_state = {k: v.clone() for k, v in model.state_dict().items()}
    x = tokens()
    with torch.no_grad():
        expected = model(x)
    lora.inject(model, lora.LoraConfig(r=8, alpha=16, dora=dora))
    layer = model.layers[0].attn.q
    assert isinstance(layer, lora.LoRALinear) and layer.lora_A.shape == (8, 64) and layer.lora_B.shape == (64, 8)
    assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))
    bound = 1 / 64**0.5  # kaiming_uniform(a=sqrt(5)) on fan_in 64, as nn.Linear and peft initialise A
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > bound / 2
    if dora:
        close(layer.magnitude, torch.linalg.norm(layer.weight, dim=1), tol=0)
    with torch.no_grad():
        close(model(x), expected, tol=0 if not dora else 1e-5)  # the update starts at zero
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(lora.adapter_state_dict(model))
    assert set(base_state) <= set(model.state_dict())  # a base checkpoint loads unchanged
    missing, unexpected = model.load_state_dict(base_state, strict=False)
    assert not unexpected and set(missing) == trainable
    line = lora.summary(model)
    n_lora = sum(model.get_parameter(n).numel() for n in trainable)
    n_all = sum(p.numel() for p in model.parameters())
    assert line.startswith("trainable ") and "\n" not in line and f"({100 * n_lora / n_all:.3g}%)" in line
    with one_line_error("already has LoRA layers"):
        lora.inject(model, lora.LoraConfig())


def test_dropout_only_in_training(base):
    model, _ = gemma.load(base("gemma1-mqa"))
    lora.inject(model, lora.LoraConfig(r=4, alpha=8, dropout=0.5, targets="q,v"))
    randomize(model)
    x = tokens()
    with torch.no_grad():
        evaluated = model.eval()(x)
        assert torch.equal(model(x), evaluated)
        model.train()
        torch.manual_seed(0)
        a = model(x)
        torch.manual_seed(1)
        assert not torch.equal(model(x), a)
        lora.merge(model)  # merged: no LoRA branch, no dropout
        close(model(x), evaluated)


@pytest.mark.parametrize("autocast", (False, True))
@pytest.mark.parametrize("dropout", (0.0, 0.3))
def test_layer_is_as_accurate_as_the_plain_formula(autocast, dropout):
    # LoRALinear runs W x + scale B A dropout(x) as one autograd node, the scale and the sum folded into the
    # matmuls, which rounds differently from autograd over the plain formula. Against float64, its output and
    # gradients must be as accurate: in float32, and under autocast with the trainer's bf16 base, float32 adapter.
    torch.manual_seed(0)
    layer = lora.LoRALinear.from_linear(torch.nn.Linear(24, 40, bias=False), r=4, scale=1.5, dropout=dropout)
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
    if autocast:
        layer.weight.data = layer.weight.data.bfloat16()

    def run(how: str, dtype: torch.dtype) -> list[torch.Tensor]:
        x = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2)).to(dtype).requires_grad_()
        a, b = (
            p.detach().to(torch.float64 if how == "float64" else p.dtype).requires_grad_()
            for p in (layer.lora_A, layer.lora_B)
        )
        torch.manual_seed(1)  # the same dropout mask
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast and how != "float64"):
            if how == "layer":
                layer.lora_A, layer.lora_B = torch.nn.Parameter(a), torch.nn.Parameter(b)
                y = layer(x)
                a, b = layer.lora_A, layer.lora_B
            else:
                dx = F.dropout(x, dropout, True) if dropout else x
                y = F.linear(x, layer.weight.to(x.dtype)) + F.linear(F.linear(dx, a), b) * layer.scale
        y.to(x.dtype if how == "float64" else torch.float32).pow(2).sum().backward()
        assert a.grad.dtype == a.dtype and b.grad.dtype == b.dtype  # the adapter's gradients keep its dtype
        return [y.detach(), x.grad, a.grad, b.grad]

    dtype = layer.weight.dtype
    exact = run("float64", torch.float64)
    for name, ours, plain, truth in zip(
        ("output", "x grad", "A grad", "B grad"), run("layer", dtype), run("plain", dtype), exact
    ):
        error = lambda t, truth=truth: ((t.double() - truth).abs().max() / truth.abs().max()).item()  # noqa: E731
        assert error(ours) <= 2 * error(plain) + 1e-7, name


def test_config_validation():
    assert lora.LoraConfig(targets="up, q").targets == ("q", "up")
    assert lora.LoraConfig(r=4, alpha=8).scale == 2 and lora.LoraConfig(r=4, alpha=8, rslora=True).scale == 4
    for bad in (dict(r=0), dict(alpha=-1), dict(dropout=1.0), dict(targets="q,lm_head"), dict(targets="")):
        with pytest.raises(GemmaError):
            lora.LoraConfig(**bad)


# ---- reading what peft writes --------------------------------------------------------------------------------------


def test_multimodal_prefix_and_legacy_magnitude_key(base, tmp_path):
    folder, theirs = peft_adapter("gemma3", "dora", tmp_path / "adapter")
    path = folder / "adapter_model.safetensors"
    renamed = {}
    for k, v in load_file(path).items():
        k = k.replace("base_model.model.model.", "base_model.model.model.language_model.")
        renamed[k + ".weight" if k.endswith("lora_magnitude_vector") else k] = v
    save_file(renamed, path)
    ours, _ = gemma.load(base("gemma3"), adapter=folder)
    x = tokens()
    with torch.no_grad():
        close(ours(x), theirs(x).logits)


@pytest.mark.parametrize(
    "spec, targets",
    [
        ("all-linear", lora.ALL_TARGETS),
        (r".*\.(q_proj|v_proj)", ("q", "v")),
        (["self_attn.o_proj", "mlp.up_proj"], ("o", "up")),
    ],
)
def test_target_module_forms(spec, targets, base, tmp_path):
    model, _ = gemma.load(base("gemma1-mha"))
    lora.inject(model, lora.LoraConfig(r=2, alpha=4, targets=targets))
    lora.save_adapter(model, tmp_path / "a")
    edit_config(tmp_path / "a", target_modules=spec)
    cfg, _ = lora.load_adapter(tmp_path / "a", model.config)
    assert cfg.targets == targets


def test_legacy_bin_adapter(base, tmp_path):
    folder, theirs = peft_adapter("gemma1-mha", "plain", tmp_path / "adapter")
    torch.save(load_file(folder / "adapter_model.safetensors"), folder / "adapter_model.bin")
    (folder / "adapter_model.safetensors").unlink()
    ours, _ = gemma.load(base("gemma1-mha"), adapter=folder)
    with torch.no_grad():
        close(ours(tokens()), theirs(tokens()).logits)


# ---- bad adapters --------------------------------------------------------------------------------------------------


@pytest.fixture
def adapter(base, tmp_path):
    """A valid plain peft adapter for gemma1-mha (2 layers), to break."""
    return peft_adapter("gemma1-mha", "plain", tmp_path / "adapter")[0]


def _rewrite(folder: Path, edit) -> None:
    path = folder / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


def _drop_one(t):
    del t["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]


def _add_head(t):
    t["base_model.model.lm_head.lora_A.weight"] = torch.zeros(R, 48)


BAD = {
    "no folder": (lambda f: shutil.rmtree(f), "no such adapter folder"),
    "no weights": (lambda f: (f / "adapter_model.safetensors").unlink(), "no adapter_model.safetensors"),
    "no config": (lambda f: (f / "adapter_config.json").unlink(), "no adapter_config.json"),
    "bad json": (lambda f: (f / "adapter_config.json").write_text("{"), "adapter_config.json"),
    "rank mismatch": (lambda f: edit_config(f, r=8), r"has shape \(4, \d+\), expected \(8, \d+\) \(r=8"),
    "target not in model": (
        lambda f: edit_config(f, target_modules=HF_TARGETS + ["lm_head"]),
        "target module 'lm_head' is not in the model",
    ),
    "tensor not targeted": (
        lambda f: edit_config(f, target_modules=["q_proj"]),
        "which target_modules in adapter_config.json does not list",
    ),
    "missing tensor": (
        lambda f: _rewrite(f, _drop_one),
        "missing tensor 'base_model.model.model.layers.1.mlp.up_proj.lora_B.weight'",
    ),
    "unexpected tensor": (lambda f: _rewrite(f, _add_head), "unexpected tensor 'base_model.model.lm_head"),
    "dora without magnitude": (lambda f: edit_config(f, use_dora=True), "missing tensor .*lora_magnitude_vector"),
    "truncated": (lambda f: (f / "adapter_model.safetensors").write_bytes(b"\x10\x00"), "corrupt or truncated"),
    "bias": (lambda f: edit_config(f, bias="all"), "bias='all' .bias training. is not supported"),
    "modules_to_save": (lambda f: edit_config(f, modules_to_save=["lm_head"]), "modules_to_save=.* is not supported"),
    "layers_to_transform": (lambda f: edit_config(f, layers_to_transform=[0]), "layers_to_transform=.* not supported"),
    "rank_pattern": (lambda f: edit_config(f, rank_pattern={"q_proj": 8}), "rank_pattern=.* is not supported"),
    "peft_type": (lambda f: edit_config(f, peft_type="IA3"), "peft_type 'IA3' is not supported"),
    "pissa": (lambda f: edit_config(f, init_lora_weights="pissa"), "init_lora_weights='pissa' is not supported"),
    "unknown option": (lambda f: edit_config(f, use_future_trick=True), "use_future_trick=True is not supported"),
    "per-layer regex": (lambda f: edit_config(f, target_modules=r".*layers\.0\..*q_proj"), "some layers only"),
}


@pytest.mark.parametrize("name", BAD)
def test_bad_adapter_is_a_one_line_error(name, adapter, base):
    breaks, message = BAD[name]
    breaks(adapter)
    with one_line_error(message) as info:
        gemma.load(base("gemma1-mha"), adapter=adapter)
    assert "\n" not in str(info.value)


def test_options_peft_allows_but_we_do_not_support(base, tmp_path):
    folder, _ = peft_adapter("gemma1-mha", "plain", tmp_path / "a", layers_to_transform=[1])
    with one_line_error("layers_to_transform=.1. is not supported"):
        gemma.load(base("gemma1-mha"), adapter=folder)
    folder, _ = peft_adapter("gemma1-mha", "plain", tmp_path / "b", rank_pattern={"q_proj": 2})
    with one_line_error("rank_pattern="):
        gemma.load(base("gemma1-mha"), adapter=folder)


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)], capture_output=True, text=True
    )


def test_cli_convert_with_adapter(adapter, base, tmp_path):
    run = _cli(base("gemma1-mha"), tmp_path / "out", "--to", "hf", "--adapter", adapter)
    assert run.returncode == 0, run.stderr
    assert not any("lora" in k for k in load_file(tmp_path / "out" / "model.safetensors"))
    edit_config(adapter, r=8)
    run = _cli(base("gemma1-mha"), tmp_path / "bad", "--to", "hf", "--adapter", adapter)
    assert run.returncode == 2 and run.stderr.startswith("error: ") and run.stderr.count("\n") == 1
    assert "expected (8, " in run.stderr and not (tmp_path / "bad").exists()


def test_adapter_loader_is_lora_io():
    from gemma.formats.load import adapter_loader

    assert adapter_loader() is lora.apply_adapter


def test_adapter_loader_without_the_lora_package(monkeypatch):
    from gemma.formats.load import adapter_loader

    monkeypatch.setitem(adapter_loader.__globals__, "ADAPTER_MODULE", "no_such_lora_package.io")
    with one_line_error("needs the lora package"):
        adapter_loader()


def test_load_with_an_adapter_from_a_checkout(adapter, base, tmp_path):
    """gemma.load(adapter=) needs no installed package metadata: a fresh interpreter that imports the checkout (the
    repo root on PYTHONPATH, ahead of any install) and whose entry points are all gone loads the adapter."""
    script = (
        "import importlib.metadata, sys\n"
        "importlib.metadata.entry_points = lambda **kw: importlib.metadata.EntryPoints(())\n"
        "import gemma\n"
        "model, _ = gemma.load(sys.argv[1], adapter=sys.argv[2])\n"
        "layers = sum(type(m).__name__ == 'LoRALinear' for m in model.modules())\n"
        "print(gemma.__file__, layers, model.lora_config is not None)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-c", script, str(base("gemma1-mha")), str(adapter)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr
    file, layers, configured = run.stdout.split()
    assert Path(file).is_relative_to(ROOT) and int(layers) == 7 * 2 and configured == "True"
