"""tools/convert.py and gemma/formats/convert.py: round trips between HF and native folders, transformers loads ours."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import gemma
from gemma.formats.checkpoint import save_hf
from gemma.formats.hf_config import from_hf_config
from gemma.formats.convert import convert
from gemma.errors import GemmaError
from tiny_models import hf_model, tokens

ROOT = Path(__file__).resolve().parents[1]
CASES = ("gemma1-mha", "gemma2", "gemma3")


def make_hf(case, folder: Path, tokenizer_path) -> Path:
    hf_model(case).save_pretrained(folder)
    shutil.copy(tokenizer_path, folder / "tokenizer.model")
    return folder


def hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("case", CASES)
def test_hf_native_hf_is_bit_identical(case, tmp_path, tiny_tokenizer_path):
    src = make_hf(case, tmp_path / "src", tiny_tokenizer_path)
    convert(src, tmp_path / "native", "native")
    convert(tmp_path / "native", tmp_path / "back", "hf")
    a, b = hf_tensors(src), hf_tensors(tmp_path / "back")
    a.pop("lm_head.weight", None)  # tied copy some writers add
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k
    cfg_a = from_hf_config(json.loads((src / "config.json").read_text()))
    cfg_b = from_hf_config(json.loads((tmp_path / "back" / "config.json").read_text()))
    assert cfg_a == cfg_b
    assert (tmp_path / "back" / "tokenizer.model").read_bytes() == Path(tiny_tokenizer_path).read_bytes()
    gen = json.loads((tmp_path / "back" / "generation_config.json").read_text())
    assert gen["bos_token_id"] == 2 and 1 in gen["eos_token_id"]


@pytest.mark.parametrize("case", CASES)
def test_native_hf_native_is_bit_identical(case, tmp_path, tiny_tokenizer_path):
    src = make_hf(case, tmp_path / "src", tiny_tokenizer_path)
    convert(src, tmp_path / "n1", "native", dtype=torch.bfloat16)
    convert(tmp_path / "n1", tmp_path / "hf", "hf")
    convert(tmp_path / "hf", tmp_path / "n2", "native")
    a, b = load_file(tmp_path / "n1" / "model.safetensors"), load_file(tmp_path / "n2" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].dtype == torch.bfloat16 for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "n1" / "config.json").read_text() == (tmp_path / "n2" / "config.json").read_text()


@pytest.mark.parametrize("case", CASES)
def test_transformers_loads_our_hf_output(case, tmp_path, tiny_tokenizer_path):
    import transformers

    src = make_hf(case, tmp_path / "src", tiny_tokenizer_path)
    convert(src, tmp_path / "native", "native")
    convert(tmp_path / "native", tmp_path / "hf", "hf")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ours, _ = gemma.load(tmp_path / "native")
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x).logits.float(), atol=1e-5, rtol=1e-5)


def test_sharded_export_loads_back(tmp_path, tiny_tokenizer_path):
    src = make_hf("gemma2", tmp_path / "src", tiny_tokenizer_path)
    model, tok = gemma.load(src)
    save_hf(
        tmp_path / "out",
        model.config,
        model.state_dict(),
        tok.model_proto,
        {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": 0},
        shard_bytes=100_000,
    )
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    again, _ = gemma.load(tmp_path / "out")
    x = tokens()
    torch.testing.assert_close(again(x), model(x), atol=0, rtol=0)


def _cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "tools" / "convert.py"), *map(str, args)], capture_output=True, text=True
    )


def test_cli_converts_and_refuses_existing_dst(tmp_path, tiny_tokenizer_path):
    src = make_hf("gemma3", tmp_path / "src", tiny_tokenizer_path)
    run = _cli(src, tmp_path / "out", "--to", "native", "--dtype", "bf16")
    assert run.returncode == 0, run.stderr
    before = (tmp_path / "out" / "model.safetensors").read_bytes()
    run = _cli(src, tmp_path / "out", "--to", "hf")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "already exists" in run.stderr
    assert run.stderr.count("\n") == 1
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == before  # untouched
    run = _cli(src, tmp_path / "out", "--to", "hf", "--force")
    assert run.returncode == 0 and (tmp_path / "out" / "generation_config.json").exists()


def test_cli_bad_source_and_format(tmp_path):
    run = _cli(tmp_path / "missing", tmp_path / "out", "--to", "hf")
    assert run.returncode == 2 and run.stderr.startswith("error: ") and "Traceback" not in run.stderr
    assert not (tmp_path / "out").exists()
    with pytest.raises(GemmaError, match="unknown output format"):
        convert(tmp_path, tmp_path / "o", "onnx")
