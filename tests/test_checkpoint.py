"""Loading and saving checkpoints: HF folders (single, sharded, multimodal), native folders, and bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import gemma
from gemma.formats.checkpoint import hf_names, save_native
from gemma.formats.hf_config import from_hf_config
from gemma.errors import GemmaError
from tiny_models import hf_model, tokens

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def hf_folder(tmp_path, tiny_tokenizer_path):
    """A tiny Gemma 3 HF checkpoint folder with a tokenizer; returns (folder, transformers model)."""
    folder = tmp_path / "hf"
    model = hf_model("gemma3")
    model.save_pretrained(folder)
    shutil.copy(tiny_tokenizer_path, folder / "tokenizer.model")
    return folder, model


def logits_of(model, x):
    with torch.no_grad():
        out = model(x)
    return out.logits.float() if hasattr(out, "logits") else out


def test_load_hf_folder(hf_folder):
    folder, ref = hf_folder
    model, tokenizer = gemma.load(folder)
    assert tokenizer.vocab_size <= model.config.vocab_size
    x = tokens()
    torch.testing.assert_close(model(x), logits_of(ref, x), atol=1e-5, rtol=1e-5)


def test_load_dtype_is_applied_per_tensor(hf_folder):
    model, _ = gemma.load(hf_folder[0], dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_sharded_hf_folder(tmp_path, tiny_tokenizer_path):
    ref = hf_model("gemma2")
    ref.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    shutil.copy(tiny_tokenizer_path, tmp_path / "tokenizer.model")
    model, _ = gemma.load(tmp_path)
    x = tokens()
    torch.testing.assert_close(model(x), logits_of(ref, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_multimodal_gemma3_checkpoint_loads_its_text_tower(tmp_path, tiny_tokenizer_path, prefix):
    ref = hf_model("gemma3")
    text_cfg = ref.config.to_dict()
    state = {
        prefix + k.removeprefix("model."): v.contiguous() for k, v in ref.state_dict().items() if k != "lm_head.weight"
    }
    state["vision_tower.vision_model.embeddings.patch_embedding.weight"] = torch.zeros(4, 3, 2, 2)
    state["multi_modal_projector.mm_input_projection_weight"] = torch.zeros(8, 64)
    save_file(state, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "model_type": "gemma3",
                "architectures": ["Gemma3ForConditionalGeneration"],
                "text_config": text_cfg,
                "vision_config": {"model_type": "siglip_vision_model"},
            }
        )
    )
    shutil.copy(tiny_tokenizer_path, tmp_path / "tokenizer.model")
    model, _ = gemma.load(tmp_path)
    x = tokens()
    torch.testing.assert_close(model(x), logits_of(ref, x), atol=1e-5, rtol=1e-5)


def test_native_round_trip_is_exact_and_atomic(hf_folder, tmp_path):
    folder, _ = hf_folder
    model, tokenizer = gemma.load(folder)
    dst = tmp_path / "native"
    save_native(dst, model.config, model.state_dict(), tokenizer.model_proto)
    assert sorted(p.name for p in dst.iterdir()) == ["config.json", "model.safetensors", "tokenizer.model"]
    assert json.loads((dst / "config.json").read_text())["format"] == "gemma-sft"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary left behind
    again, tok2 = gemma.load(dst)
    assert again.config == model.config
    for k, v in model.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert tok2.model_proto == tokenizer.model_proto
    with pytest.raises(GemmaError, match="already exists"):
        save_native(dst, model.config, model.state_dict(), tokenizer.model_proto)


def test_interrupted_save_leaves_nothing(hf_folder, tmp_path):
    model, tokenizer = gemma.load(hf_folder[0])
    state = dict(model.state_dict())
    state["bad"] = object()  # the writer fails part-way
    with pytest.raises(Exception):  # noqa: B017 - whatever the writer raises, nothing may be left behind
        save_native(tmp_path / "out", model.config, state, tokenizer.model_proto)
    assert list(tmp_path.iterdir()) == [tmp_path / "hf"]


# ---- bad input: one line that names the problem -------------------------------------------------------------------


def _error(source) -> str:
    with pytest.raises(GemmaError) as info:
        gemma.load(source)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_truncated_safetensors(hf_folder):
    folder, _ = hf_folder
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    assert "model.safetensors: corrupt or truncated" in _error(folder)


def test_missing_tensor(hf_folder):
    folder, _ = hf_folder
    state = load_file(folder / "model.safetensors")
    del state["model.layers.1.self_attn.k_norm.weight"]
    save_file(state, folder / "model.safetensors")
    assert "missing tensor 'model.layers.1.self_attn.k_norm.weight'" in _error(folder)


def test_extra_tensor(hf_folder):
    folder, _ = hf_folder
    state = load_file(folder / "model.safetensors")
    state["model.layers.7.mlp.gate_proj.weight"] = torch.zeros(2, 2)
    save_file(state, folder / "model.safetensors")
    assert "unexpected tensor 'model.layers.7.mlp.gate_proj.weight'" in _error(folder)


def test_wrong_shape(hf_folder):
    folder, _ = hf_folder
    state = load_file(folder / "model.safetensors")
    state["model.layers.0.self_attn.q_proj.weight"] = torch.zeros(64, 63)
    save_file(state, folder / "model.safetensors")
    message = _error(folder)
    assert "'model.layers.0.self_attn.q_proj.weight' has shape (64, 63)" in message and "(64, 64)" in message


def test_missing_tokenizer(hf_folder):
    folder, _ = hf_folder
    (folder / "tokenizer.model").unlink()
    assert "no tokenizer.model" in _error(folder)


def test_corrupt_tokenizer(hf_folder):
    folder, _ = hf_folder
    (folder / "tokenizer.model").write_bytes(b"not a sentencepiece model")
    assert "tokenizer.model" in _error(folder)


def test_missing_config(hf_folder):
    folder, _ = hf_folder
    (folder / "config.json").unlink()
    assert "no config.json" in _error(folder)


def test_missing_path_and_uncached_repo(tmp_path, monkeypatch):
    assert "no such file" in _error(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert "not in the local HF cache" in _error("nobody-xyz/not-a-model")


def test_names_table_covers_every_parameter():
    for case in ("gemma1-mqa", "gemma2", "gemma3"):
        ref = hf_model(case)
        cfg = from_hf_config(ref.config.to_dict())
        hf_keys = {k for k in ref.state_dict() if k != "lm_head.weight"}
        assert set(hf_names(cfg).values()) == hf_keys


def test_command_line_error_is_one_line_with_status_2(hf_folder):
    folder, _ = hf_folder
    (folder / "tokenizer.model").unlink()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-m", "gemma", str(folder)], capture_output=True, text=True, env=env)
    assert run.returncode == 2
    assert run.stderr.startswith("error: ") and run.stderr.count("\n") == 1 and "Traceback" not in run.stderr


def test_command_line_summary(hf_folder):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = subprocess.run(
        [sys.executable, "-m", "gemma", str(hf_folder[0])], capture_output=True, text=True, env=env, check=True
    )
    summary = json.loads(run.stdout)
    assert summary["layer_types"] == "LLG" and summary["config"]["use_qk_norm"] is True
