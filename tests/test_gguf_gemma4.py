"""Gemma 4 GGUF files (architecture gemma4) against the HF folders they are converted from, on the tiny random
models of test_gemma4.py: gguf_config and read_gguf_weights give the config and the float32 state dict that the HF
model gives, bit for bit, and so the same logits; transformers' own GGUF loader reads the same file; what does not
fit is a one-line error.

`convert` writes each file as llama.cpp's converter does (conversion/gemma.py: Gemma4Model over Gemma3Model and
TextModel), written here from reading it:
- metadata: the keys TextModel.set_gguf_parameters writes, with Gemma3Model's and Gemma4Model's overrides (where a
  key is written twice the last value stays, so each is written once with that value); key_length is the full
  layers' head_dim, head_count_kv one per layer when the config has a global kv-head count, feed_forward_length one
  per layer with the double-wide MLP, sliding_window_pattern true for sliding layers;
- tensors: rope_freqs first (generate_extra_tensors: 1 for each pair a full layer turns, 1e30 for the rest), then the
  checkpoint's tensors in file order, renamed by Gemma4Model.filter_tensors / modify_tensors and gguf's tensor map,
  values untouched (norm_shift 0: Gemma 4 files store the norm weights as they are); F32 throughout, or, for
  outtype F16, F16 except what the converter keeps F32 (1-D tensors, norms, ffn_gate_inp, names not ending .weight);
- a vocabulary as Gemma4Model.set_vocab writes one: tokenizer.ggml.model "gemma4", tokens, scores, types and merges.
The converter reads the hub's config.json shape (global_head_dim, num_global_key_value_heads), not the
per_layer_config that transformers 5.24 saves, so `_hparams` recovers those two from it.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

from gemma.errors import GemmaError
from tiny_gguf import add_value
from gemma.formats.checkpoint import build_model, hf_names
from gemma.formats.gguf import gguf_config, open_gguf, read_gguf, read_gguf_weights
from test_gemma4 import CASES, hf_gemma4, ours_from, tokens

S, F = "sliding_attention", "full_attention"
Q = gguf.GGMLQuantizationType

# ---- the converter, as llama.cpp's does it ------------------------------------------------------------------------

_SPECIAL = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>"]
_MERGES = ["▁ t", "h e", "▁t he", "▁ a", "i n", "▁ s", "e r"]


def _vocab(n: int) -> tuple[list[str], list[float], list[int]]:
    """A gemma4-style vocabulary of n tokens: control tokens first, then pieces and the pieces the merges make."""
    pieces = ["\n", "▁"] + list("abcdefghijklmnopqrstuvwxyz") + [m.replace(" ", "") for m in _MERGES]
    pieces += [f"<unused{i}>" for i in range(n - len(_SPECIAL) - len(pieces))]
    toks = _SPECIAL + pieces
    types = [3] * len(_SPECIAL) + [1] * len(pieces)
    return toks, [0.0] * len(toks), types


def _hparams(hf) -> dict:
    """The converter's hparams (AutoConfig(...).to_dict()) as a hub config.json gives them: global_head_dim and, with
    keys-equal-values, num_global_key_value_heads, where transformers 5.24 keeps a per_layer_config."""
    h = hf.config.to_dict()
    full = next(iter(h.pop("per_layer_config").values()))
    h["global_head_dim"] = full["head_dim"]
    h["num_global_key_value_heads"] = full.get("num_key_value_heads") if h["attention_k_eq_v"] else None
    return h


def _gguf_name(name: str, name_map) -> str:
    """An HF checkpoint name as the converter renames it."""
    if name.endswith("layer_scalar") or ".experts." in name and not name.endswith(".weight"):
        name += ".weight"  # Gemma4Model.filter_tensors
    bid = name.split(".")[2] if name.startswith("model.layers.") else None
    if name.endswith("router.scale"):  # Gemma4Model.modify_tensors
        return f"blk.{bid}.ffn_gate_inp.scale"
    if name.endswith(".per_expert_scale"):
        return f"blk.{bid}.ffn_down_exps.scale"
    mapped = name_map.get_name(name, try_suffixes=(".weight", ".bias"))
    assert mapped is not None, name
    return mapped


def _keeps_f32(gguf_name: str, data: np.ndarray) -> bool:
    # prepare_tensors: 1-D tensors and norms, the router (FFN_GATE_INP) and names not ending .weight stay F32.
    return (
        data.ndim <= 1
        or gguf_name.endswith(("_norm.weight", "ffn_gate_inp.weight"))
        or not gguf_name.endswith(".weight")
    )


def convert(hf, folder, name="model.gguf", *, outtype=Q.F32, drop=(), extra=None, meta=None, rope_freqs=None):
    """Write hf as llama.cpp's converter would into folder/name; return the path. `drop` leaves out tensors, `extra`
    adds F32 ones, `meta` replaces metadata keys (None removes one), `rope_freqs` replaces its values."""
    h = _hparams(hf)
    n = h["num_hidden_layers"]
    swa = [t == S for t in h["layer_types"]]
    first_shared = n - h["num_kv_shared_layers"]
    rope = h["rope_parameters"]
    kv = {
        # TextModel.set_gguf_parameters
        "block_count": n,
        "context_length": h["max_position_embeddings"],
        "embedding_length": h["hidden_size"],
        "feed_forward_length": h["intermediate_size"],
        "attention.head_count": h["num_attention_heads"],
        "attention.head_count_kv": h["num_key_value_heads"],
        "rope.freq_base": rope[F]["rope_theta"],
        "rope.freq_base_swa": rope[S]["rope_theta"],
        "attention.layer_norm_rms_epsilon": h["rms_norm_eps"],
        "expert_count": h["num_experts"],
        "expert_used_count": h["top_k_experts"],
        # Gemma3Model.set_gguf_parameters
        "final_logit_softcapping": h["final_logit_softcapping"],
        "attention.sliding_window": h["sliding_window"],
        # Gemma4Model.set_gguf_parameters
        "attention.shared_kv_layers": h["num_kv_shared_layers"],
        "embedding_length_per_layer_input": h["hidden_size_per_layer_input"] or 0,
        "attention.sliding_window_pattern": swa,
        "attention.key_length": h["global_head_dim"],
        "attention.value_length": h["global_head_dim"],
        "attention.key_length_swa": h["head_dim"],
        "attention.value_length_swa": h["head_dim"],
        "expert_feed_forward_length": h["moe_intermediate_size"],
        "rope.dimension_count": h["global_head_dim"],
        "rope.dimension_count_swa": h["head_dim"],
    }
    if h["use_double_wide_mlp"]:
        kv["feed_forward_length"] = [h["intermediate_size"] * (2 if i >= first_shared else 1) for i in range(n)]
    if h["num_global_key_value_heads"] is not None:
        kv["attention.head_count_kv"] = [
            h["num_key_value_heads"] if s else h["num_global_key_value_heads"] for s in swa
        ]
    kv = {f"gemma4.{k}": v for k, v in kv.items()}
    toks, scores, types = _vocab(h["vocab_size"])
    kv.update(
        {
            "general.file_type": int(gguf.LlamaFileType.ALL_F32 if outtype == Q.F32 else gguf.LlamaFileType.MOSTLY_F16),
            "tokenizer.ggml.model": "gemma4",
            "tokenizer.ggml.tokens": toks,
            "tokenizer.ggml.scores": scores,
            "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.merges": _MERGES,
            "tokenizer.ggml.bos_token_id": 2,
            "tokenizer.ggml.eos_token_id": 1,
            "tokenizer.ggml.unknown_token_id": 3,
            "tokenizer.ggml.padding_token_id": 0,
            "tokenizer.ggml.add_space_prefix": False,
            "tokenizer.ggml.add_bos_token": True,
        }
    )
    kv.update(meta or {})

    path = folder / name
    writer = gguf.GGUFWriter(str(path), "gemma4")
    for key, value in kv.items():
        if value is not None:
            add_value(writer, key, value)

    # Gemma4Model.generate_extra_tensors: ROPE_FREQS, used by the full layers only
    turning = int(h["global_head_dim"] * rope[F]["partial_rotary_factor"] / 2)
    freqs = [1.0] * turning + [1e30] * (h["global_head_dim"] // 2 - turning)
    tensors = {"rope_freqs.weight": np.asarray(freqs if rope_freqs is None else rope_freqs, np.float32)}
    hf.save_pretrained(folder / "hf")  # the converter reads the checkpoint's files
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, n)
    for key, value in load_file(folder / "hf" / "model.safetensors").items():
        tensors[_gguf_name(key, name_map)] = value.float().numpy()
    for key, value in tensors.items():
        if key in drop:
            continue
        if outtype == Q.F16 and not _keeps_f32(key, value):
            writer.add_tensor(key, value.astype(np.float16))
        else:
            writer.add_tensor(key, value)
    for key, value in (extra or {}).items():
        writer.add_tensor(key, np.asarray(value, np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def read(path):
    reader = open_gguf(path)
    cfg = gguf_config(reader, str(path))
    return cfg, read_gguf_weights(reader, cfg, str(path))


def raises_one_line(fn, *needles) -> str:
    with pytest.raises(GemmaError) as info:
        fn()
    msg = str(info.value)
    assert "\n" not in msg, msg
    for needle in needles:
        assert str(needle) in msg, msg
    return msg


# ---- the same model ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
    """(hf model, our model from its HF state, the converted file) per case."""
    hf = hf_gemma4(request.param)
    path = convert(hf, tmp_path_factory.mktemp(request.param.replace("=", "_")))
    return hf, ours_from(hf), path


def test_the_file_reads_as_the_hf_folder(case):
    hf, ours, path = case
    cfg, state = read(path)
    assert cfg == ours.config
    want = ours.state_dict()
    assert list(state) == list(want)
    for name, tensor in want.items():
        assert state[name].dtype == torch.float32 and torch.equal(state[name], tensor), name
    ids = tokens(2, 13)
    with torch.no_grad():
        assert torch.equal(build_model(cfg, state)(ids), ours(ids))


def test_f16_file_holds_what_the_converter_rounds(tmp_path):
    """outtype F16: the 2-D and 3-D weights (experts included) come back as their float16 roundings, what the
    converter keeps F32 (norms, scalars, scales, the router) comes back exact."""
    hf = hf_gemma4("all")
    ours = ours_from(hf)
    cfg, state = read(convert(hf, tmp_path, outtype=Q.F16))
    assert cfg == ours.config
    names = {
        n: _gguf_name(n, gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA4, cfg.num_layers)) for n in hf.state_dict()
    }
    for native, hf_name in hf_names(cfg).items():
        want = hf.state_dict()[hf_name]
        if not _keeps_f32(names[hf_name], want.numpy()):
            want = want.half().float()
        assert torch.equal(state[native], want), native


# ---- an independent reader: transformers' own GGUF loader --------------------------------------------------------

# transformers 5.24 (modeling_gguf_pytorch_utils.py, get_gguf_hf_weights_map) maps a gemma4 file's tensors by looking
# each HF parameter name up in gguf's tensor map. The layer scalar and the experts have no ".weight" in HF, so it
# looks for blk.N.layer_output_scale where the converter writes blk.N.layer_output_scale.weight (likewise the
# experts); router.scale and per_expert_scale are not in the map at all (the converter renames them by hand). It never
# loads these five and leaves them at their initial values. (Its config from the file alone is further off
# (integrations/ggml.py): it reads neither sliding_window_pattern, key_length_swa, embedding_length_per_layer_input
# nor the expert keys, keeps head_dim 256 and 256-wide per-layer embeddings, and refuses head_count_kv and
# feed_forward_length arrays; so the config is given here.)
_TF_CANNOT_NAME = (
    "layer_scalar",
    "router.scale",
    "router.per_expert_scale",
    "experts.gate_up_proj",
    "experts.down_proj",
)


def _transformers_from_gguf(path, config):
    model, info = tf.AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        config=config,
        attn_implementation="eager",
        experts_implementation="eager",
        output_loading_info=True,
    )
    return model.eval(), set(info["missing_keys"])


def test_transformers_reads_the_same_tensors(case):
    """Every tensor transformers' GGUF loader can name comes out of the file equal to the HF model's: the names, the
    shapes and the untouched norm weights agree with an independent reader."""
    hf, _, path = case
    theirs, missing = _transformers_from_gguf(path, hf.config)
    want = hf.state_dict()
    assert missing <= {k for k in want if k.endswith(_TF_CANNOT_NAME)}  # and every other tensor was loaded
    for name, tensor in theirs.state_dict().items():
        if name not in missing:
            assert torch.equal(tensor, want[name]), name


# transformers' GGUF loader does not load the experts, router.scale or per_expert_scale: the MoE cases are left out.
DENSE = sorted(name for name, fields in CASES.items() if "num_experts" not in fields)


@pytest.mark.parametrize("name", DENSE)
def test_transformers_gives_the_same_logits(name, tmp_path):
    """With the layer scalars at their initial 1 (which transformers leaves them at), its model read from the file
    and ours read from the file give the HF model's logits. Not for MoE: it cannot load the experts."""
    hf = hf_gemma4(name)
    for key, buffer in hf.named_buffers():
        if key.endswith("layer_scalar"):
            buffer.fill_(1.0)
    path = convert(hf, tmp_path)
    theirs, _ = _transformers_from_gguf(path, hf.config)
    cfg, state = read(path)
    ids = tokens(2, 13)
    with torch.no_grad():
        expected = hf(ids).logits
        assert torch.equal(theirs(ids).logits, expected)
        torch.testing.assert_close(build_model(cfg, state)(ids), expected, rtol=0, atol=1e-5)  # SDPA vs eager


# ---- what does not fit --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def kv_case():
    return hf_gemma4("k=v")  # six layers, full layers 2 and 5 without attn_v


def test_a_missing_tensor_is_named(kv_case, tmp_path):
    path = convert(kv_case, tmp_path, drop=("blk.3.ffn_up.weight",))
    raises_one_line(lambda: read(path), path, "missing tensor", "blk.3.ffn_up.weight")
    # A sliding layer without attn_v: llama.cpp would take its keys as values, our model does not.
    path = convert(kv_case, tmp_path, "v.gguf", drop=("blk.1.attn_v.weight",))
    raises_one_line(lambda: read(path), "missing tensor", "blk.1.attn_v.weight")
    path = convert(kv_case, tmp_path, "freqs.gguf", drop=("rope_freqs.weight",))
    raises_one_line(lambda: read(path), "missing tensor", "rope_freqs.weight")


def test_a_wrong_shape_is_named(kv_case, tmp_path):
    path = convert(kv_case, tmp_path, meta={"gemma4.feed_forward_length": 80})
    raises_one_line(lambda: read(path), path, "blk.0.ffn_down.weight", "(48, 96)", "(48, 80)")
    path = convert(kv_case, tmp_path, "v.gguf", meta={"gemma4.attention.key_length_swa": 16})
    raises_one_line(lambda: read(path), "'gemma4.attention.value_length_swa' (12) differs from key_length_swa (16)")


def test_an_unexpected_tensor_is_named(kv_case, tmp_path):
    path = convert(kv_case, tmp_path, extra={"blk.2.attn_v.weight": np.zeros((24, 48))})
    raises_one_line(lambda: read(path), "some full-attention layers have attn_v and some do not")
    path = convert(kv_case, tmp_path, "bias.gguf", extra={"blk.0.attn_q.bias": np.zeros(48)})
    raises_one_line(lambda: read(path), path, "unexpected tensor", "blk.0.attn_q.bias")


def test_the_unused_keys_and_values_of_kv_sharing_layers_are_skipped(tmp_path):
    """Released E2B checkpoints carry k/v for the layers that reuse another's, and the converter carries them over."""
    hf = hf_gemma4("E")
    dead = {f"blk.6.{n}.weight": np.zeros((24, 48)) for n in ("attn_k", "attn_v")}
    cfg, state = read(convert(hf, tmp_path, extra={**dead, "blk.6.attn_k_norm.weight": np.zeros(24)}))
    assert cfg == ours_from(hf).config and "layers.6.attn.k.weight" not in state


def test_rope_freqs_must_be_proportional_rope_and_the_configs(kv_case, tmp_path):
    # 12 pairs on the full layers (head_dim 24), of which 3 turn.
    rescaled = [1.0] * 3 + [1e30] * 8 + [0.5]
    path = convert(kv_case, tmp_path, rope_freqs=rescaled)
    raises_one_line(lambda: read(path), path, "rope_freqs.weight", "not proportional RoPE")
    path = convert(kv_case, tmp_path, "short.gguf", rope_freqs=[1.0] * 3 + [1e30] * 3)
    raises_one_line(lambda: read(path), "rope_freqs.weight", "shape (6,)", "(12,)")
    # A file that turns 6 pairs is proportional RoPE of 0.5; a config of 0.25 given with it disagrees.
    path = convert(kv_case, tmp_path, "half.gguf", rope_freqs=[1.0] * 6 + [1e30] * 6)
    reader = open_gguf(path)
    cfg = gguf_config(reader, str(path))
    assert cfg.rope_full_rotated == 0.5
    cfg.rope_full_rotated = 0.25
    raises_one_line(lambda: read_gguf_weights(reader, cfg, str(path)), "turns 6 of 12", "rope_full_rotated (0.25)")


def test_per_layer_metadata_that_varies_within_a_kind_is_refused(kv_case, tmp_path):
    path = convert(kv_case, tmp_path, meta={"gemma4.attention.head_count_kv": [2, 1, 1, 2, 2, 1]})
    raises_one_line(lambda: read(path), "'gemma4.attention.head_count_kv' differs among the sliding layers")
    path = convert(kv_case, tmp_path, "ff.gguf", meta={"gemma4.feed_forward_length": [96] * 5 + [50]})
    raises_one_line(lambda: read(path), "'gemma4.feed_forward_length' differs among the other layers")
    path = convert(kv_case, tmp_path, "pattern.gguf", meta={"gemma4.attention.sliding_window_pattern": [True] * 5})
    raises_one_line(lambda: read(path), "sliding_window_pattern' should hold one bool per layer (6")
    path = convert(kv_case, tmp_path, "eps.gguf", meta={"gemma4.attention.layer_norm_rms_epsilon": None})
    raises_one_line(lambda: read(path), "missing metadata key 'gemma4.attention.layer_norm_rms_epsilon'")


def test_read_gguf_reads_the_gemma4_tokenizer(case):
    """The vocabulary as BPE by the file's merges (tokens and merges of the converter's sketch above; the real
    round trip is test_gguf_write.py's)."""
    hf, ours, path = case
    cfg, state, tok = read_gguf(path)
    assert cfg == ours.config and tok.chat_format == 4
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    ids = tok.encode("the theater", bos=False)
    assert tok.decode(ids) == "the theater" and len(ids) < len("the theater")  # the merges ran
