"""LoRA for the Gemma models: the layer, injection by module replacement, exact merging, PEFT-format adapters.

from lora import LoraConfig, inject, summary, save_adapter
inject(model, LoraConfig(r=16, alpha=32))        # all seven projections of every layer
print(summary(model))                            # trainable 1.47M / 270M (0.545%)
save_adapter(model, "out/adapter")               # adapter_config.json + adapter_model.safetensors
"""

from lora.config import ALL_TARGETS, LoraConfig
from lora.inject import adapter_state_dict, inject, lora_layers, merge, summary, unmerge
from lora.io import apply_adapter, load_adapter, merged_state_dict, save_adapter
from lora.layer import LoRALinear

__all__ = [
    "ALL_TARGETS",
    "LoRALinear",
    "LoraConfig",
    "adapter_state_dict",
    "apply_adapter",
    "inject",
    "load_adapter",
    "lora_layers",
    "merge",
    "merged_state_dict",
    "save_adapter",
    "summary",
    "unmerge",
]
