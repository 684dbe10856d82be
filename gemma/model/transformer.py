"""The Gemma decoder (generations 1 to 4), built from the modules in layers.py and attention.py."""

from __future__ import annotations

import math

import torch
import torch.utils.checkpoint
from torch import nn

from gemma.errors import GemmaError
from gemma.model.attention import Attention, attention_mask
from gemma.model.config import FULL, SLIDING, GemmaConfig
from gemma.model.kv_cache import KVCache
from gemma.model.layers import Embedding, GeGLU, Linear, RMSNorm, gelu_mul, rope_cos_sin, rope_inv_freq, softcap
from gemma.model.matvec import fresh
from gemma.model.moe import MoE


class Block(nn.Module):
    """One decoder layer. Gemma 1: norm -> attn -> add, norm -> mlp -> add. Gemma 2/3 also normalise each
    sublayer's output before the residual add ("sandwich" norms). Gemma 4 may add a mixture of experts beside the
    MLP, then a per-layer input (PLE) after it, and scales the layer's output by a learned scalar."""

    def __init__(self, cfg: GemmaConfig, layer: int):
        super().__init__()
        norm = lambda: RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)  # noqa: E731
        self.attn_norm = norm()
        self.attn = Attention(cfg, layer)
        self.mlp_norm = norm()
        self.mlp = GeGLU(cfg.hidden_size, cfg.intermediate_of(layer))
        if cfg.sandwich_norms:
            self.post_attn_norm = norm()
            self.post_mlp_norm = norm()
        else:
            self.post_attn_norm = self.post_mlp_norm = None
        # The MoE block reads the residual (not the MLP's normed input); its output and the dense MLP's are each
        # normed, then summed before post_mlp_norm.
        self.moe = MoE(cfg) if cfg.num_experts else None
        self.dense_norm = norm() if cfg.num_experts else None
        if cfg.per_layer_input_size:
            self.ple_gate = Linear(cfg.hidden_size, cfg.per_layer_input_size)
            self.ple_out = Linear(cfg.per_layer_input_size, cfg.hidden_size)
            self.ple_norm = norm()
        else:
            self.ple_gate = self.ple_out = self.ple_norm = None
        # Gemma 4 scales the layer's whole output (the residual stream included) by a learned scalar, kept in the
        # checkpoint as a buffer.
        self.layer_scalar = nn.Buffer(torch.ones(1)) if cfg.layer_scalar else None

    def forward(self, x, cos, sin, mask, cache=None, last_only: bool = False, per_layer=None, shared=None):
        """(B, T, hidden) -> ((B, T, hidden), kv), or (B, 1, hidden) for the last column with `last_only` (all
        columns still go into the cache). `per_layer` (B, T, P) is this layer's PLE input; `shared` and `kv` the
        keys and values that KV-sharing layers reuse (see Attention.forward)."""
        h, kv = self.attn(self.attn_norm(x), cos, sin, mask, cache, last_only, shared)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = (x[:, -1:] if last_only else x) + h
        h = self.mlp(self.mlp_norm(x))
        if self.moe is not None:
            h = self.dense_norm(h) + self.moe(x.flatten(0, 1)).view_as(x)
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        x = x + h
        if self.ple_gate is not None:
            per_layer = per_layer[:, -1:] if last_only else per_layer
            x = x + self.ple_norm(self.ple_out(fresh(gelu_mul(self.ple_gate(fresh(x)), per_layer))))
        if self.layer_scalar is not None:
            x = x * self.layer_scalar
        return x, kv


class PerLayerInputs(nn.Module):
    """Gemma 4's per-layer embeddings (PLE; E2B, E4B): for each token, one P-wide input per layer, the sum of a
    token part (its row of a packed (vocab, layers x P) table, x sqrt(P)) and a context part (the scaled token
    embedding projected to layers x P, x hidden ** -0.5, RMS-normed over each layer's P), x 2 ** -0.5."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        L, P = cfg.num_layers, cfg.per_layer_input_size
        self.embed = nn.Embedding(cfg.per_layer_vocab_size or cfg.vocab_size, L * P)
        self.proj = Linear(cfg.hidden_size, L * P)
        self.proj_norm = RMSNorm(P, cfg.norm_eps, cfg.norm_offset)

    def forward(self, tokens: torch.Tensor, embedded: torch.Tensor) -> torch.Tensor:
        """(B, T, layers, P) from the tokens (B, T) and their scaled embeddings (B, T, hidden)."""
        B, T = tokens.shape
        P = self.proj_norm.weight.shape[0]
        rows = self.embed(tokens)
        rows = rows * torch.tensor(P**0.5, dtype=rows.dtype)  # the scale in the table's dtype, as the reference
        context = self.proj(fresh(embedded)) * embedded.shape[-1] ** -0.5
        context = self.proj_norm(context.view(B, T, -1, P))
        return (context + rows.view(B, T, -1, P)) * 2**-0.5


class Gemma(nn.Module):
    """tokens (B, T) -> logits (B, T, vocab), float32."""

    def __init__(self, cfg: GemmaConfig):
        super().__init__()
        self.config = cfg
        self.embed = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.per_layer = PerLayerInputs(cfg) if cfg.per_layer_input_size else None
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps, cfg.norm_offset)
        # Recompute each block's activations in the backward pass instead of keeping them (training only).
        self.grad_checkpointing = False
        # The LoRA settings (a lora.config.LoraConfig) once lora.inject has added adapter layers; typed loosely
        # because gemma/ imports nothing from lora/.
        self.lora_config: object | None = None
        # The weights' storage once gemma.model.quantize has replaced them ("int8"); None: plain parameters.
        self.quantized: str | None = None
        # A compiled decoding step (gemma.model.static_decode.DecodeStep) once gemma.model.compiled has made one.
        self.decode_step = None

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
        per_layer = self.per_layer(tokens, x) if self.per_layer is not None else None
        shared = {}  # kind -> the (keys, values, mask) of its storing layer, for the layers that reuse them
        checkpointing = self.grad_checkpointing and self.training and torch.is_grad_enabled()
        last = len(self.layers) - 1
        for i, block in enumerate(self.layers):
            if last_only and i == cfg.first_shared and x.shape[1] > 1:
                # From the first KV-sharing layer on no layer makes keys or values, so nothing reads the other
                # columns again: only the last one goes on.
                x = x[:, -1:]
                rope = {kind: (cos[:, -1:], sin[:, -1:]) for kind, (cos, sin) in rope.items()}
                masks = {kind: None if m is None else m[:, :, -1:] for kind, m in masks.items()}
                per_layer = None if per_layer is None else per_layer[:, -1:]
            kind = cfg.layer_types[i]
            args = (x, *rope[kind], masks[kind], cache, last_only and i == last and x.shape[1] > 1)
            args += (None if per_layer is None else per_layer[:, :, i], shared.get(kind) if cfg.reuses_kv(i) else None)
            if checkpointing:
                x, kv = torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
            else:
                x, kv = block(*args)
            if kv is not None:
                shared[kind] = kv
        if last_only and x.shape[1] > 1:
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
