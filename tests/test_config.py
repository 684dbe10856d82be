"""config.json in both shapes found in the wild, for every generation, and the presets."""

from __future__ import annotations

import dataclasses

import pytest

from gemma.formats.hf_config import from_hf_config, to_hf_config
from gemma.model.config import FULL, PRESETS, SLIDING, GemmaConfig, preset
from gemma.errors import GemmaError

# config.json files as the hub publishes them (written by transformers 4.x), trimmed of keys we do not read.
HUB_GEMMA_2B = {
    "architectures": ["GemmaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 2,
    "eos_token_id": 1,
    "head_dim": 256,
    "hidden_act": "gelu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 16384,
    "max_position_embeddings": 8192,
    "model_type": "gemma",
    "num_attention_heads": 8,
    "num_hidden_layers": 18,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "rms_norm_eps": 1e-06,
    "rope_scaling": None,
    "rope_theta": 10000.0,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.38.0.dev0",
    "use_cache": True,
    "vocab_size": 256000,
}
HUB_GEMMA_7B = {
    **HUB_GEMMA_2B,
    "hidden_size": 3072,
    "intermediate_size": 24576,
    "num_attention_heads": 16,
    "num_hidden_layers": 28,
    "num_key_value_heads": 16,
}
HUB_GEMMA2_2B = {
    "architectures": ["Gemma2ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": 50.0,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": [1, 107],
    "final_logit_softcapping": 30.0,
    "head_dim": 256,
    "hidden_act": "gelu_pytorch_tanh",
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 2304,
    "initializer_range": 0.02,
    "intermediate_size": 9216,
    "max_position_embeddings": 8192,
    "model_type": "gemma2",
    "num_attention_heads": 8,
    "num_hidden_layers": 26,
    "num_key_value_heads": 4,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "torch_dtype": "float32",
    "transformers_version": "4.42.4",
    "use_cache": True,
    "vocab_size": 256000,
}
HUB_GEMMA2_27B = {
    **HUB_GEMMA2_2B,
    "hidden_size": 4608,
    "intermediate_size": 36864,
    "num_attention_heads": 32,
    "num_hidden_layers": 46,
    "num_key_value_heads": 16,
    "head_dim": 128,
    "query_pre_attn_scalar": 144,
}
HUB_GEMMA3_1B = {
    "architectures": ["Gemma3ForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "attn_logit_softcapping": None,
    "bos_token_id": 2,
    "cache_implementation": "hybrid",
    "eos_token_id": 1,
    "final_logit_softcapping": None,
    "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh",
    "hidden_size": 1152,
    "initializer_range": 0.02,
    "intermediate_size": 6912,
    "max_position_embeddings": 32768,
    "model_type": "gemma3_text",
    "num_attention_heads": 4,
    "num_hidden_layers": 26,
    "num_key_value_heads": 1,
    "pad_token_id": 0,
    "query_pre_attn_scalar": 256,
    "rms_norm_eps": 1e-06,
    "rope_local_base_freq": 10000,
    "rope_scaling": None,
    "rope_theta": 1000000,
    "sliding_window": 512,
    "sliding_window_pattern": 6,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "use_cache": True,
    "vocab_size": 262144,
}
HUB_GEMMA3_270M = {
    **{k: v for k, v in HUB_GEMMA3_1B.items() if k not in ("sliding_window_pattern", "cache_implementation")},
    "_sliding_window_pattern": 6,
    "hidden_size": 640,
    "intermediate_size": 2048,
    "num_hidden_layers": 18,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 3,
    "use_bidirectional_attention": False,
    "transformers_version": "4.55.0.dev0",
}
# Multimodal: the hub lists only the text settings that differ from transformers' defaults.
HUB_GEMMA3_4B = {
    "architectures": ["Gemma3ForConditionalGeneration"],
    "boi_token_index": 255999,
    "eoi_token_index": 256000,
    "eos_token_id": [1, 106],
    "image_token_index": 262144,
    "initializer_range": 0.02,
    "mm_tokens_per_image": 256,
    "model_type": "gemma3",
    "text_config": {
        "hidden_size": 2560,
        "intermediate_size": 10240,
        "model_type": "gemma3_text",
        "num_hidden_layers": 34,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
    "torch_dtype": "bfloat16",
    "transformers_version": "4.50.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 896, "model_type": "siglip_vision_model"},
}
HUB_GEMMA3_27B = {
    **HUB_GEMMA3_4B,
    "text_config": {
        "head_dim": 128,
        "hidden_size": 5376,
        "intermediate_size": 21504,
        "model_type": "gemma3_text",
        "num_attention_heads": 32,
        "num_hidden_layers": 62,
        "num_key_value_heads": 16,
        "query_pre_attn_scalar": 168,
        "rope_scaling": {"factor": 8.0, "rope_type": "linear"},
        "sliding_window": 1024,
    },
}

HUB = {
    "2b": HUB_GEMMA_2B,
    "7b": HUB_GEMMA_7B,
    "2-2b": HUB_GEMMA2_2B,
    "2-27b": HUB_GEMMA2_27B,
    "3-270m": HUB_GEMMA3_270M,
    "3-1b": HUB_GEMMA3_1B,
    "3-4b": HUB_GEMMA3_4B,
    "3-27b": HUB_GEMMA3_27B,
}


def same(a: GemmaConfig, b: GemmaConfig) -> bool:
    return dataclasses.replace(a, hf_repo=None) == dataclasses.replace(b, hf_repo=None)


@pytest.mark.parametrize("name", HUB)
def test_hub_config_matches_preset(name):
    assert same(from_hf_config(HUB[name]), preset(name))


def _transformers5_dict(hub: dict) -> dict:
    """The same config as transformers 5.x writes it (rope_parameters, layer_types)."""
    import transformers as tf

    cls = {
        "gemma": tf.GemmaConfig,
        "gemma2": tf.Gemma2Config,
        "gemma3_text": tf.Gemma3TextConfig,
        "gemma3": tf.Gemma3Config,
    }[hub["model_type"]]
    keep = {
        k: v
        for k, v in hub.items()
        if k not in ("architectures", "transformers_version", "torch_dtype", "cache_implementation", "vision_config")
    }
    return cls(**keep).to_dict()


@pytest.mark.parametrize("name", HUB)
def test_transformers5_config_matches_preset(name):
    written = _transformers5_dict(HUB[name])
    text = written.get("text_config", written)
    assert "rope_parameters" in text
    if name != "2b" and name != "7b":
        assert "layer_types" in text
    assert same(from_hf_config(written), preset(name))


def test_preset_features():
    g1, g2, g3 = preset("7b"), preset("2-9b"), preset("3-4b")
    assert g1.num_heads * g1.head_dim != g1.hidden_size and g1.attn_scale == 256**-0.5
    assert g2.layer_types[:2] == (SLIDING, FULL) and g2.attn_softcap == 50.0 and g2.final_softcap == 30.0
    assert g3.layer_types[:6] == (SLIDING,) * 5 + (FULL,) and g3.rope_scaling == 8.0 and g3.use_qk_norm
    assert preset("3-27b").attn_scale == 168**-0.5
    for name in PRESETS:
        assert preset(name).hf_repo.startswith("google/")


@pytest.mark.parametrize("name", PRESETS)
def test_to_hf_config_round_trips_through_transformers(name):
    import transformers as tf

    cfg = preset(name)
    hf = to_hf_config(cfg)
    loaded = tf.AutoConfig.for_model(**hf).to_dict()  # transformers accepts what we write
    assert same(from_hf_config(hf), cfg)
    assert same(from_hf_config(loaded), cfg)


def test_native_dict_round_trip():
    cfg = preset("3-1b")
    assert GemmaConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"model_type": "llama"}, "not a Gemma text model"),
        ({**HUB_GEMMA_2B, "hidden_act": "relu"}, "unsupported activation"),
        ({**HUB_GEMMA_2B, "num_key_value_heads": 3}, "not a multiple"),
        ({**HUB_GEMMA_2B, "hidden_size": "big"}, "hidden_size"),
        ({**HUB_GEMMA3_1B, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported RoPE type"),
        ({**HUB_GEMMA3_1B, "layer_types": ["chunked_attention"] * 26}, "unknown layer type"),
    ],
)
def test_bad_hf_config_is_a_one_line_error(bad, message):
    with pytest.raises(GemmaError, match=message) as info:
        from_hf_config(bad)
    assert "\n" not in str(info.value)


def test_bad_native_config():
    with pytest.raises(GemmaError, match="unknown field 'heads'"):
        GemmaConfig.from_dict({**preset("2b").to_dict(), "heads": 3})
