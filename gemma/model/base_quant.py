"""A frozen base stored quantized, to fine-tune LoRA over it (`--base-quant nf4|int8`, QLoRA): NF4 or int8 weights
for the seven projections of every block, dequantized one layer at a time inside the forward and backward passes.

NF4 is QLoRA's 4-bit NormalFloat (Dettmers et al. 2023, arXiv:2305.14314) as bitsandbytes implements it, bit for
bit (tests/test_base_quant.py checks against `bitsandbytes.functional` where it installs):
- the weight, flattened, in blocks of 64 values; each block scaled by its absolute maximum (`x * (1 / absmax)`,
  float32, clamped to [-1, 1]) and each value stored as the index of the nearest of the 16 NF4 levels (a value
  exactly between two levels takes the lower), two indices a byte, the first in the high half;
- with double quantization (the default, as peft's QLoRA recipe sets it) the float32 absmax of each block is itself
  stored in 8 bits: its mean is subtracted (kept as one float32 `offset`), then in blocks of 256 each is scaled by
  the block's absmax and stored as the index of the nearest of the 256 values of bitsandbytes' signed dynamic
  8-bit map (Dettmers 2015, arXiv:1511.04561), which we compute from its definition below. (bitsandbytes' PyTorch
  kernel does exactly this; its compiled CPU kernel, which searches the map with an approximate bucketed search,
  picks the level on the other side for a few values in ten thousand, so a base that peft quantizes on a CPU can
  differ from ours there by one level of one block's absmax: a change of about 1% of that block's scale);
- dequantization: level[index] * absmax in float32, rounded once to the compute dtype (bitsandbytes' compiled CPU
  kernel agrees where each row is a whole number of 64-value blocks, as in every Gemma projection, and gets other
  shapes wrong; its PyTorch kernel agrees everywhere).
A weight costs 0.5 bytes a value plus 4 bytes per 64 values of absmax (single) or 1 byte per 64 plus 4 per 16384
(double): 0.5625 or 0.516 bytes a value, against 2 in bf16.

int8 is our own weight-only format (as `--quantize int8`, gemma.model.quantize): one float32 scale per output row,
symmetric round to nearest. bitsandbytes' 8-bit layers (LLM.int8) also quantize the activations and keep outlier
columns in fp16, so their products differ from a weight-only int8; there is no reference to equal here.

The embedding (and the tied output head), the norms and Gemma 4's other small layers stay in the compute dtype, as
bitsandbytes' transformers integration leaves the head: the head's logits are what the loss reads, and on Gemma's
262144-token vocabularies 4-bit rows lose the most there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from gemma.errors import GemmaError

MODES = ("nf4", "int8")
NF4_BLOCK = 64  # values per absmax
DEQUANT_VALUES = 1 << 20  # a large weight is dequantized this many values at a time (4 MB of float32)
STATS_BLOCK = 256  # absmax values per second-level scale (double quantization)

# The 16 NF4 levels as QLoRA publishes them (paper, Appendix E; bitsandbytes' table): quantiles of N(0, 1) scaled
# to [-1, 1], with an exact zero. Data, not a computation: the float32 values are the format.
NF4_LEVELS = (
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
    -0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725,
    0.24611230194568634, 0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
)  # fmt: skip


def dynamic_map(signed: bool = True, exponent_bits: int = 7, total_bits: int = 8) -> torch.Tensor:
    """The dynamic 8-bit map (Dettmers 2015) as bitsandbytes builds it, sorted: for each exponent e = 0 .. 6 the
    midpoints of a float32 linspace over [0.1, 1] with 2^e + 1 points (signed: half as many fraction points as
    unsigned) scaled by 10^(e - 6), with their negatives, then 0 and 1. 256 values in [-1, 1]."""
    values: list[float] = []
    fraction_bits = total_bits - 1
    for e in range(exponent_bits):
        points = 2 ** (e + fraction_bits - exponent_bits + (0 if signed else 1)) + 1
        edges = torch.linspace(0.1, 1, points, dtype=torch.float32)
        middles = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + e)
        values += (scale * middles).tolist()  # scaled in float32, as the map is defined
        if signed:
            values += (-scale * middles).tolist()
    extra = 2 ** (fraction_bits - exponent_bits) - 1  # 0 for the 8-bit signed map
    if extra > 0:
        edges = torch.linspace(0.1, 1, extra + 1, dtype=torch.float32)
        middles = (edges[:-1] + edges[1:]) / 2.0
        scale = 10 ** (-(exponent_bits - 1) + exponent_bits - 1)
        values += (scale * middles).tolist() + ((-scale * middles).tolist() if signed else [])
    values += [0.0, 1.0]
    if len(values) != 2**total_bits:
        raise ValueError(f"the dynamic map has {len(values)} values, not {2**total_bits}")
    return torch.tensor(sorted(values), dtype=torch.float32)


_TABLES: dict = {}


def _table(name: str, device: torch.device) -> torch.Tensor:
    """The NF4 levels or the dynamic map on `device`, made once per device and shared by every weight."""
    key = (name, str(device))
    if key not in _TABLES:
        if name == "pairs":  # byte -> its two levels, high half first: one row gathered decodes a byte
            levels = torch.tensor(NF4_LEVELS, dtype=torch.float32)
            values = torch.stack([levels.repeat_interleave(16), levels.repeat(16)], dim=1).contiguous()  # (256, 2)
        else:
            values = torch.tensor(NF4_LEVELS, dtype=torch.float32) if name == "nf4" else dynamic_map()
        _TABLES[key] = values.to(device)
    return _TABLES[key]


def quantize_blocks(values: torch.Tensor, levels: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest level per value (int64), float32 absmax per block) of `values` (flat), in blocks of
    `block` (the last may be shorter). `levels` sorted; a value exactly between two takes the lower."""
    x = values.reshape(-1).float()
    n = x.numel()
    full = n - n % block
    blocks = x[:full].view(-1, block)
    absmax = blocks.abs().amax(dim=1)
    scaled = (blocks * (1.0 / absmax.clamp(min=1e-38))[:, None]).clamp_(-1, 1).reshape(-1)
    if full < n:
        tail_max = x[full:].abs().amax().clamp(min=1e-38)
        absmax = torch.cat([absmax, tail_max[None]])
        scaled = torch.cat([scaled, (x[full:] / tail_max).clamp_(-1, 1)])
    middles = (levels[:-1] + levels[1:]) / 2
    return torch.bucketize(scaled, middles), absmax


def dequantize_blocks(index: torch.Tensor, levels: torch.Tensor, absmax: torch.Tensor, block: int) -> torch.Tensor:
    """float32 levels[index] * absmax of each index's block (flat)."""
    values = levels[index.long()]
    n = values.numel()
    if n % block:  # a short last block
        return values * absmax.repeat_interleave(block)[:n]
    return (values.view(-1, block) * absmax[:, None]).reshape(-1)


def _nf4_pack(flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(packed NF4 indices, uint8 two a byte; float32 absmax per block) of a flat weight. Whole blocks are done a
    slice at a time (each block is quantized on its own, so slicing changes nothing), so that the float32 copy and
    the int64 indices never exist for the whole of a large table (the 270M's embedding: 1.3 GB of indices)."""
    levels = _table("nf4", flat.device)
    n = flat.numel()

    def pack(index: torch.Tensor) -> torch.Tensor:
        if index.numel() % 2:  # an odd count: the last byte's low half holds the level of 0
            index = F.pad(index, (0, 1), value=NF4_LEVELS.index(0.0))
        nibbles = index.to(torch.uint8)
        return (nibbles[0::2] << 4) | nibbles[1::2]

    if n % NF4_BLOCK:
        index, absmax = quantize_blocks(flat, levels, NF4_BLOCK)
        return pack(index), absmax
    packed = torch.empty(n // 2, dtype=torch.uint8, device=flat.device)
    absmax = torch.empty(n // NF4_BLOCK, dtype=torch.float32, device=flat.device)
    step = max(NF4_BLOCK, DEQUANT_VALUES // NF4_BLOCK * NF4_BLOCK)
    for start in range(0, n, step):
        index, block_max = quantize_blocks(flat[start : start + step], levels, NF4_BLOCK)
        packed[start // 2 : (start + index.numel()) // 2] = pack(index)
        absmax[start // NF4_BLOCK : start // NF4_BLOCK + block_max.numel()] = block_max
    return packed, absmax


class NF4Weight(nn.Module):
    """A frozen weight (out, in) in NF4 (see the module's docstring); `dequantize(dtype)` gives it back."""

    requires_grad = False  # read like a frozen Parameter's flag by the layers that hold one

    def __init__(self, weight: torch.Tensor, double_quant: bool = True):
        super().__init__()
        self.shape, self.dtype = torch.Size(weight.shape), weight.dtype
        self.double_quant = double_quant
        packed, absmax = _nf4_pack(weight.detach().reshape(-1))
        self.register_buffer("packed", packed)
        if double_quant:
            offset = absmax.mean()
            q, absmax2 = quantize_blocks(absmax - offset, _table("dynamic", weight.device), STATS_BLOCK)
            self.register_buffer("absmax_q", q.to(torch.uint8))
            self.register_buffer("absmax2", absmax2)
            self.register_buffer("offset", offset)
        else:
            self.register_buffer("absmax", absmax)

    def block_absmax(self) -> torch.Tensor:
        """The float32 absmax of each 64-value block (dequantized from 8 bits under double quantization)."""
        if not self.double_quant:
            return self.absmax
        code = _table("dynamic", self.absmax_q.device)
        return dequantize_blocks(self.absmax_q, code, self.absmax2, STATS_BLOCK) + self.offset

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        n, dtype = self.shape.numel(), dtype or self.dtype
        if n % NF4_BLOCK:  # a short last block (no Gemma projection has one)
            index = torch.stack([self.packed >> 4, self.packed & 0xF], dim=1).reshape(-1)[:n]
            values = dequantize_blocks(index, _table("nf4", self.packed.device), self.block_absmax(), NF4_BLOCK)
            return values.view(self.shape).to(dtype)
        # Whole blocks: each byte's two levels gathered at once (1.7x faster than level by level), a slice of
        # blocks at a time into the output, so that the float32 values never exist for the whole of a large table.
        out = torch.empty(self.shape, dtype=dtype, device=self.packed.device).view(-1, NF4_BLOCK)
        absmax = self.block_absmax()
        step = max(1, DEQUANT_VALUES // NF4_BLOCK)
        for b in range(0, out.shape[0], step):
            out[b : b + step] = self._blocks(b, min(b + step, out.shape[0]), absmax)
        return out.view(self.shape)

    def _blocks(self, start: int, stop: int, absmax: torch.Tensor) -> torch.Tensor:
        """float32 values of blocks start..stop-1, (stop - start, 64), given every block's absmax."""
        packed = self.packed[start * NF4_BLOCK // 2 : stop * NF4_BLOCK // 2]
        values = torch.index_select(_table("pairs", packed.device), 0, packed.long()).view(-1, NF4_BLOCK)
        return values.mul_(absmax[start:stop, None])

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `index` (any shape) of the weight, dequantized: an embedding lookup. Rows must be whole blocks."""
        width = self.shape[1]
        per_row = width // NF4_BLOCK
        absmax = self.block_absmax().view(-1, per_row)[index]  # (..., blocks a row)
        packed = self.packed.view(-1, width // 2)[index]  # (..., bytes a row)
        values = torch.index_select(_table("pairs", packed.device), 0, packed.reshape(-1).long())
        values = values.view(*index.shape, per_row, NF4_BLOCK).mul_(absmax[..., None])
        return values.view(*index.shape, width).to(dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, nf4, double_quant={self.double_quant}"


class Int8Weight(nn.Module):
    """A frozen weight (out, in) as int8 with one float32 scale per row (symmetric, round to nearest)."""

    requires_grad = False

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        from gemma.model.quantize import quantize_rows

        self.shape, self.dtype = torch.Size(weight.shape), weight.dtype
        q, scale = quantize_rows(weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(dtype or self.dtype)

    def rows(self, index: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Rows `index` (any shape) of the weight, dequantized: an embedding lookup."""
        return (self.q[index].float() * self.scale[index, None]).to(dtype or self.dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.shape)}, int8"


def quantized_weight(weight: torch.Tensor, mode: str) -> nn.Module:
    if mode == "nf4":
        return NF4Weight(weight)
    if mode == "int8":
        return Int8Weight(weight)
    raise GemmaError(f"unknown base quantization {mode!r}; choose one of {', '.join(MODES)}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype x's matrix products run in: autocast's when it is on, else x's own."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


class _QuantMatmul(torch.autograd.Function):
    """x @ W.T for a quantized frozen W, dequantized in the forward pass and again in the backward (only the
    quantized form is kept between them): the gradient goes to x only."""

    @staticmethod
    def forward(ctx, x, qweight):
        dtype = compute_dtype(x)
        with torch.autocast(x.device.type, enabled=False):
            out = F.linear(x.to(dtype), qweight.dequantize(dtype))
        ctx.qweight, ctx.dtype, ctx.x_dtype = qweight, dtype, x.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        with torch.autocast(grad.device.type, enabled=False):
            grad_x = grad.to(ctx.dtype) @ ctx.qweight.dequantize(ctx.dtype)
        return grad_x.to(ctx.x_dtype), None


class QuantLinear(nn.Module):
    """A bias-free frozen linear layer over a quantized weight (the projections that carry no adapter)."""

    def __init__(self, weight: torch.Tensor, mode: str):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.weight = quantized_weight(weight, mode)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _QuantMatmul.apply(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class QuantEmbedding(nn.Module):
    """The token embedding (and tied output head) over a quantized table (`--base-quant-embed`): a lookup
    dequantizes the rows asked for; `weight` (what the chunked loss multiplies by) and `project` dequantize the
    table a slice at a time into the compute dtype."""

    def __init__(self, weight: torch.Tensor, mode: str):
        super().__init__()
        self.num_embeddings, self.embedding_dim = weight.shape
        if mode == "nf4" and self.embedding_dim % NF4_BLOCK:
            raise GemmaError(
                f"--base-quant-embed nf4 needs a hidden size that is a multiple of {NF4_BLOCK}, "
                f"not {self.embedding_dim}"
            )
        self.table = quantized_weight(weight, mode)

    @property
    def weight(self) -> torch.Tensor:
        return self.table.dequantize()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.table.rows(tokens)

    def project(self, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.table.dequantize(compute_dtype(h)).to(h.dtype))

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}"


def quantize_base(model, mode: str, embed: bool = False):
    """Store, in place, the seven projections of every block of a Gemma quantized (`mode`: nf4 or int8): an adapted
    layer (LoRA) keeps its adapter over the quantized weight, a plain one becomes a QuantLinear. Returns the model.

    The norms and Gemma 4's per-layer-input and router layers stay in their dtype; so does the embedding (also the
    output head) unless `embed`. Each weight is replaced as soon as it is quantized, so the full-precision copy of
    the model is freed layer by layer."""
    from gemma.model.layers import AdaptedLinear, Linear

    if mode not in MODES:
        raise GemmaError(f"unknown base quantization {mode!r}; choose one of {', '.join(MODES)}")
    if getattr(model, "quantized", None):
        raise GemmaError(f"the model is already quantized ({model.quantized})")
    for module in [m for block in model.layers for m in (block.attn, block.mlp)]:
        for name, child in list(module.named_children()):
            if isinstance(child, AdaptedLinear):
                if child.merged:
                    raise GemmaError("unmerge the LoRA adapter before quantizing the base under it")
                weight = child.weight
                del child.weight  # a Parameter's slot takes no module
                child.weight = quantized_weight(weight.data, mode)
            elif isinstance(child, Linear):
                setattr(module, name, QuantLinear(child.weight.data, mode))
    if embed:
        model.embed = QuantEmbedding(model.embed.weight.data, mode)
    model.base_quant = mode
    return model
