"""The Gemma decoder (generations 1, 2 and 3), built from the modules in layers.py and attention.py."""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from gemma.errors import GemmaError
from gemma.model.attention import Attention, attention_mask
from gemma.model.config import FULL, SLIDING, GemmaConfig
from gemma.model.kv_cache import KVCache
from gemma.model.layers import Embedding, GeGLU, RMSNorm, rope_cos_sin, rope_inv_freq, softcap


class Block(nn.Module):
    """One decoder layer. Gemma 1: norm -> attn -> add, norm -> mlp -> add. Gemma 2/3 also normalise each
    sublayer's output before the residual add ("sandwich" norms)."""

    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(cfg, layer)
        self.mlp_norm = norm()
        self.mlp = GeGLU(cfg.hidden_size, cfg.intermediate_size)
        if cfg.sandwich_norms:
            self.post_attn_norm = norm()
            self.post_mlp_norm = norm()
        else:
            self.post_attn_norm = self.post_mlp_norm = None
        # Gemma 4 scales the layer's whole output (the residual stream included) by a learned scalar, kept in the
        # checkpoint as a buffer.
        self.layer_scalar = nn.Buffer(torch.ones(1)) if cfg.layer_scalar else None

    def forward(self, x, cos, sin, mask, cache=None, last_only: bool = False):
        """(B, T, hidden) -> (B, T, hidden), or (B, 1, hidden) for the last column with `last_only` (all columns
        still go into the cache)."""
        h = self.attn(self.attn_norm(x), cos, sin, mask, cache, last_only)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = (x[:, -1:] if last_only else x) + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        if self.layer_scalar is not None:
            return (x + h) * self.layer_scalar
        return x + h


class Gemma(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab), float32."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
        # Recompute each block's activations in the backward pass instead of keeping them (training only).
        self.grad_checkpointing = False
        # The LoRA settings (a lora.config.LoraConfig) once lora.inject has added adapter layers; typed loosely
        # because gemma/ imports nothing from lora/.
        self.lora_config: object | None = None
        # The weights' storage once gemma.model.quantize has replaced them ("int8"); None: plain parameters.
        self.quantized: str | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.norm.weight.dtype  # the compute dtype (the weights may be quantized: gemma.model.quantize)

    @property
    def device(self) -> torch.device:
        return self.norm.weight.device

    def rope_tables(self, positions: torch.Tensor, dtype: torch.dtype) -> dict[str, tuple[torch.Tensor, ...]]:
        """(cos, sin) per layer kind present: {SLIDING or FULL: (cos, sin)}; local (sliding) and global (full)
        layers use different bases."""
        cfg = self.config
        out = {}
        for kind in set(cfg.layer_types):
            if kind == SLIDING:
                inv = rope_inv_freq(cfg.head_dim, cfg.rope_local_theta, 1.0, positions.device)
            else:
                inv = rope_inv_freq(
                    cfg.head_dim_of(FULL), cfg.rope_theta, cfg.rope_scaling, positions.device, cfg.rope_full_rotated
                )
            out[kind] = rope_cos_sin(positions, inv, dtype)
        return out

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.embed(tokens)
        # The sqrt(hidden) normaliser is cast to the activation dtype first, as the reference does
        # (in bf16 sqrt(3072) = 55.4256 becomes 55.5); parity depends on it.
        return h * torch.tensor(math.sqrt(self.config.hidden_size), dtype=h.dtype)

    def hidden_states(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """The final-normed hidden states (B, T, hidden), before the output head.

        With `last_only`, those of the last column only (B, 1, hidden), which is all that generation needs: the
        last layer then works out keys and values (for the cache) for every column, and its query, attention and
        MLP for the last column alone, which saves that much of a long prefill.
        `positions` (B, T) default to 0..T-1 (after what the cache holds); `segment_ids` (B, T) confine attention
        to equal ids (packing). With a `cache`, the new tokens attend to everything cached before them and are
        stored in it; a position of -1 marks a padding token that no other token attends to.
        """
        B, T = tokens.shape
        if positions is None:
            start = cache.length if cache is not None else 0
            positions = torch.arange(start, start + T, device=tokens.device).expand(B, T)
        x = self.embed_tokens(tokens)
        rope = self.rope_tables(positions.clamp(min=0), x.dtype)
        cfg = self.config
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are not supported with a KV cache")
            cache.plan(positions)
            masks = {FULL: None, SLIDING: None}  # the cache supplies them
        else:
            masks = {
                FULL: attention_mask(positions, None, segment_ids),
                SLIDING: attention_mask(positions, cfg.sliding_window, segment_ids),
            }
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            kind = cfg.layer_types[i]
            if checkpointing:
                x = torch.utils.checkpoint.checkpoint(
                    block, x, *rope[kind], masks[kind], cache, last_only and i == last, use_reentrant=False
                )
            else:
                x = block(x, *rope[kind], masks[kind], cache, last_only and i == last)
        if last_only and not self.layers:
            x = x[:, -1:]
        return self.norm(x)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """The tied output head, then the final softcap, in float32."""
        logits = self.embed.project(h).float()
        if self.config.final_softcap is not None:
            logits = softcap(logits, self.config.final_softcap)
        return logits

    def forward(
        self,
        tokens: torch.Tensor,
        positions: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        return self.logits(self.hidden_states(tokens, positions, segment_ids, cache))

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KV cache for `batch` rows of up to `max_len` tokens (at most the model's context), in the model's dtype
        and device."""
        if max_len > self.config.max_seq_len:
            raise GemmaError(f"a cache of {max_len} tokens exceeds the model's context of {self.config.max_seq_len}")
        return KVCache(self.config, batch, max_len, dtype or self.dtype, self.device)
