"""Data-parallel training under torchrun: the process group, DDP or FSDP2 around the loss, and the collectives the
loop needs.

`torchrun --nproc_per_node=N -m train.sft ...` starts N copies of the same command. Each finds RANK, LOCAL_RANK and
WORLD_SIZE in its environment, and `start()` joins them into one process group (nccl on CUDA, gloo on CPU). Every
process loads the model and the data and reads its share of each global batch (`train.data.shard`); the loop keeps
them in step:

- The target tokens of the whole global batch are summed over the processes before the backward passes, and each
  process divides its summed loss by that count, times the number of processes because DDP and FSDP average
  gradients. So a global batch gives the same update however many processes share it (normalising per process
  or per micro-batch instead would weight a short sequence's tokens more than a long one's).
- Gradients are synchronised once per optimizer step, on the last micro-batch (`no_sync` under DDP,
  `set_requires_gradient_sync(False)` under FSDP2). A process with fewer micro-batches than the others (the small
  last group of an epoch) runs empty ones: under FSDP every forward and backward is a collective, under DDP the
  last backward is.
- A user's mistake found on some processes only becomes the same GemmaError on all of them (`agreed_errors`), so no
  process waits for one that has quit; only rank 0 reports it. Any other error ends its process with a traceback,
  torchrun then stops the others, and a process blocked in a collective gives up after `--dist-timeout` seconds at
  the latest.

Only rank 0 writes logs, metrics, plots, reports and adapters. A checkpoint holds rank 0's state plus one file per
process: its RNG state and, under FSDP, its shards of the adapter and of the optimizer state.
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from gemma.model.config import PRESETS, GemmaConfig, preset
from gemma.cli import pick_device
from gemma.errors import GemmaError
from lora.inject import adapter_state_dict
from lora.io import save_adapter, write_adapter

_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def launched() -> bool:
    """Whether this process was started by torchrun (or a launcher that sets the same variables)."""
    return all(k in os.environ for k in _ENV)


def env_rank() -> int:
    """This process's rank from the environment (0 outside torchrun); usable after the group is gone."""
    return int(os.environ.get("RANK", "0")) if launched() else 0


class AgreedError(GemmaError):
    """A user's mistake that every process raises at the same point; rank 0 reports it, the others stay quiet."""


def error_to_report(exc: GemmaError) -> GemmaError | None:
    """What this process should print for a user's mistake: None when rank 0 reports it for everyone; an error seen
    by this rank alone (outside rank 0) keeps its text, prefixed with the rank."""
    rank = env_rank()
    if rank == 0:
        return exc
    if isinstance(exc, AgreedError):
        return None
    return GemmaError(f"[rank {rank}] {exc}")


@dataclass
class Dist:
    """Where this process stands: alone (mode None, no process group) or rank `rank` of `world` under torchrun."""

    device: torch.device  # this process's device: cuda:LOCAL_RANK under torchrun on CUDA
    world: int = 1  # processes in the job
    rank: int = 0  # this process's place among them; rank 0 writes the files
    mode: str | None = None  # None (one process), "ddp" or "fsdp"

    @property
    def enabled(self) -> bool:
        return self.mode is not None

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.mode == "fsdp"

    @property
    def layout(self) -> dict:
        """What a checkpoint must match to resume here."""
        return {"world": self.world, "sharded": self.sharded}

    def all_sum(self, *values: float) -> list[float]:
        """The sums over all processes of a few numbers, in one all-reduce (float64: counts stay exact)."""
        if not self.enabled:
            return [float(v) for v in values]
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.tolist()

    def broadcast(self, obj):
        """Rank 0's `obj` on every process."""
        if not self.enabled:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    @contextmanager
    def agreed_errors(self):
        """Run a block that may raise GemmaError on some processes only; then all raise the same AgreedError.

        The block must hold no collective (a process that raised would never reach it). The exchange at its end
        is one, so it also keeps the processes in step. Other exceptions pass through: that process ends, and
        torchrun (or the collective timeout) ends the others.
        """
        error = None
        try:
            yield
        except GemmaError as exc:
            if not self.enabled:
                raise
            error = str(exc)
        if not self.enabled:
            return
        errors: list = [None] * self.world
        dist.all_gather_object(errors, error)
        found = [(r, e) for r, e in enumerate(errors) if e is not None]
        if found:
            rank, message = found[0]
            if len(found) < self.world or len({e for _, e in found}) > 1:
                message = f"rank {rank}: {message}"
            raise AgreedError(message)

    def close(self) -> None:
        if self.enabled and dist.is_initialized():
            dist.destroy_process_group()


def start(opts) -> Dist:
    """Join the process group when started by torchrun; a plain Dist for one process otherwise."""
    if not launched():
        return Dist(device=pick_device(opts.device))
    world, rank, local = (int(os.environ[k]) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK"))
    try:  # every process checks the same options: rank 0 reports a mistake
        if opts.precision == "fp16" and opts.distributed == "fsdp":
            raise GemmaError(
                "--precision fp16 is not supported with --distributed fsdp (the gradient scaler would "
                "have to agree on overflows across shards); use bf16"
            )
        if opts.device and opts.device.startswith("cuda:"):
            raise GemmaError(
                f"--device {opts.device}: under torchrun each process uses cuda:LOCAL_RANK; "
                "pass --device cuda (and CUDA_VISIBLE_DEVICES to choose the GPUs)"
            )
        device = pick_device(opts.device)
        if device.type == "cuda" and local >= torch.cuda.device_count():
            raise GemmaError(
                f"LOCAL_RANK {local} but this machine shows {torch.cuda.device_count()} CUDA "
                "device(s); use --nproc_per_node <= the GPUs of a node"
            )
    except GemmaError as exc:
        raise AgreedError(str(exc)) from None
    if device.type == "cuda":
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(
        backend, timeout=timedelta(seconds=opts.dist_timeout), device_id=device if device.type == "cuda" else None
    )
    return Dist(device=device, world=world, rank=rank, mode=opts.distributed)


def fsdp_units(model) -> list[nn.Module]:
    """The modules FSDP shards as units of their own: each block, and Gemma 4's per-layer embeddings (the E2B
    table is half the model; as a unit it is gathered only while it computes, before the first block, and it
    needs no gradient)."""
    return [*model.layers, *([model.per_layer] if model.per_layer is not None else [])]


def _whole(t: torch.Tensor) -> torch.Tensor:
    """A tensor on the CPU whole: a sharded DTensor gathered (a collective), a plain one as it is."""
    from torch.distributed.tensor import DTensor

    return (t.full_tensor() if isinstance(t, DTensor) else t).detach().cpu()


class Replicas:
    """A loss module as every process runs it: as is (one process), under DDP, or sharded by FSDP2.

    `module(batch)` returns the summed token loss of a micro-batch. It is this module, not the Gemma model, that
    is wrapped: the loss path calls `model.hidden_states` and the chunked loss rather than `model.forward`, which
    would bypass a wrapper around the model itself. FSDP2 shards each unit in `blocks` (`fsdp_units`) and, through
    the root wrapper, what is left (the embedding, which is also the tied output head, and the final norm).
    """

    def __init__(self, module: nn.Module, blocks, d: Dist, precision: str):
        self.module, self.d = module, d
        self.wrapped = module
        if d.mode == "ddp":
            params = [p for p in module.parameters() if p.requires_grad]
            # Every process loaded the same base weights; only the adapter needs to start from rank 0's values
            # (init_sync would broadcast the frozen base too, the whole model).
            for p in params:
                dist.broadcast(p.data, src=0)
            from torch.nn.parallel import DistributedDataParallel

            # No buffer is state that training changes (rotary tables, a quantized base): none to broadcast.
            self.wrapped = DistributedDataParallel(
                module,
                device_ids=[d.device.index] if d.device.type == "cuda" else None,
                init_sync=False,
                broadcast_buffers=False,
            )
        elif d.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh(d.device.type, (d.world,))
            # bf16: weights gathered and computed in bf16, gradients reduced and kept (like the adapter and the
            # optimizer state) in float32.
            mp = (
                MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                if precision == "bf16"
                else MixedPrecisionPolicy()
            )
            for block in blocks:
                fully_shard(block, mesh=mesh, mp_policy=mp)
            fully_shard(module, mesh=mesh, mp_policy=mp)
        self.params = [p for p in module.parameters() if p.requires_grad]  # sharded DTensors under FSDP
        self.full_output = None  # --full: (tokenizer, format, dtype) of the model folder written instead of an adapter

    def __call__(self, batch: dict) -> torch.Tensor:
        return self.wrapped(batch)

    def sync(self, on: bool):
        """Context for one micro-batch: synchronise gradients in its backward pass or not (accumulate locally)."""
        if self.d.mode == "ddp" and not on:
            return self.wrapped.no_sync()
        if self.d.mode == "fsdp":
            self.wrapped.set_requires_gradient_sync(on)
        return nullcontext()

    @torch.no_grad()
    def evaluate(self, batch: dict) -> torch.Tensor:
        # DDP adds nothing to a forward pass without gradients; FSDP must gather the weights.
        return (self.wrapped if self.d.sharded else self.module)(batch)

    def clip_grad_norm(self, max_norm: float) -> float:
        """Clip the adapter's gradient to `max_norm` in total; returns the norm before clipping."""
        if not self.d.sharded:
            return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))
        from torch.distributed.tensor import DTensor

        total = torch.nn.utils.get_total_norm([p.grad for p in self.params if p.grad is not None])
        if isinstance(total, DTensor):  # a partial sum over the shards until reduced
            total = total.full_tensor()
        torch.nn.utils.clip_grads_with_norm_(self.params, max_norm, total)
        return float(total)

    # ---- the adapter and the sharded state ----

    def gather_adapter(self, model) -> dict[str, torch.Tensor] | None:
        """Under FSDP the whole adapter (--full: the whole model) by native name, on the CPU (a collective: every
        process calls it); None otherwise (each process holds it whole)."""
        if not self.d.sharded:
            return None
        if self.full_output is not None:
            return {k: _whole(v) for k, v in model.state_dict().items()}
        return {k: v.full_tensor().detach().cpu() for k, v in adapter_state_dict(model).items()}

    def write_adapter(self, model, folder: Path, gathered: dict | None, base: str | None) -> None:
        """Write the adapter as a PEFT folder, or under --full the model folder (rank 0 calls this; `gathered`
        from gather_adapter)."""
        if self.full_output is not None:
            from train.full import write_full_model

            tokenizer, fmt, dtype = self.full_output
            state = gathered if gathered is not None else model.state_dict()
            write_full_model(folder, model, state, tokenizer, fmt, dtype)
        elif gathered is None:
            save_adapter(model, folder, base_model_name_or_path=base, force=True)
        else:  # the model's parameters are shards here: the same writer, given the gathered whole tensors
            write_adapter(folder, model.config, model.lora_config, gathered, base_model_name_or_path=base, force=True)

    def save_adapter(self, model, folder: Path, base: str | None) -> None:
        """Every process calls this; rank 0 writes."""
        gathered = self.gather_adapter(model)
        if self.d.main:
            self.write_adapter(model, folder, gathered, base)

    def local_state(self, model, optimizer) -> dict:
        """This process's shards of the adapter and of the optimizer state (FSDP), as plain tensors."""
        trainable = {n: p.to_local().detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        opt = optimizer.state_dict()
        state = {i: {k: _local(v) for k, v in s.items()} for i, s in opt["state"].items()}
        return {"trainable": trainable, "optimizer": {"state": state, "param_groups": opt["param_groups"]}}

    def load_local_state(self, model, optimizer, own: dict, where: Path) -> None:
        """The inverse of local_state, for a run with the same number of processes."""
        from torch.distributed.tensor import DTensor

        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        trainable = own["trainable"]
        if set(trainable) != set(named):
            raise GemmaError(f"{where}: the checkpoint's adapter does not match this run's LoRA settings")
        with torch.no_grad():
            for name, tensor in trainable.items():
                local = named[name].to_local()
                if local.shape != tensor.shape:
                    raise GemmaError(
                        f"{where}: shard of {name!r} has shape {tuple(tensor.shape)}, this process "
                        f"holds {tuple(local.shape)}"
                    )
                local.copy_(tensor)
        params = [p for group in optimizer.param_groups for p in group["params"]]
        saved = own["optimizer"]
        state = {}
        for i, s in saved["state"].items():
            p = params[int(i)]
            state[i] = {
                k: (
                    DTensor.from_local(
                        v.to(p.device), p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
                    )
                    if torch.is_tensor(v) and v.shape == p.to_local().shape and v.dim()
                    else v
                )
                for k, v in s.items()
            }
        optimizer.load_state_dict({"state": state, "param_groups": saved["param_groups"]})


def _local(v):
    from torch.distributed.tensor import DTensor

    return v.to_local().detach().clone() if isinstance(v, DTensor) else v


# ---- memory per GPU, from the model shapes (the README table) --------------------------------------------------------

_GB = 1e9


def parameter_counts(cfg: GemmaConfig, lora_r: int = 16) -> dict[str, int]:
    """Parameters of the base model (`total`; `embed`: the embedding and final norm, FSDP's root group;
    `per_layer`: Gemma 4's per-layer embeddings; `block`: the largest block) and of a rank-`lora_r` adapter on all
    seven projections where a layer has them, read off the model built on the meta device (no memory)."""
    from gemma.model import Gemma

    with torch.device("meta"):
        model = Gemma(cfg)
    total = sum(p.numel() for p in model.parameters())
    blocks = [sum(p.numel() for p in block.parameters()) for block in model.layers]
    per_layer = sum(p.numel() for p in model.per_layer.parameters()) if model.per_layer is not None else 0
    projections = [m for block in model.layers for m in (*block.attn.children(), *block.mlp.children())]
    projections = [m for m in projections if isinstance(m, nn.Linear)]
    lora = sum(lora_r * (m.in_features + m.out_features) for m in projections)
    embed = total - sum(blocks) - per_layer
    return {
        "embed": embed,
        "per_layer": per_layer,
        "block": max(blocks),
        "total": total,
        "lora": lora,
        "projections": sum(m.in_features * m.out_features for m in projections),  # what --base-quant stores
    }


# Bytes a value of a projection takes in NF4 with double quantization (gemma.model.base_quant): half a byte, one
# byte of absmax per 64 values, a float32 second-level scale per 256 absmax values.
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)
METHODS = ("lora", "nf4", "full")


def memory_per_gpu(
    cfg: GemmaConfig, processes: int = 1, mode: str = "ddp", lora_r: int = 16, method: str = "lora"
) -> float | None:
    """GB (10^9 bytes) each GPU holds for the model and its training state, activations aside (None: a combination
    that is refused, FSDP over a quantized base).

    `lora`, one process or DDP: the bf16 base, and per adapter parameter 4 bytes of fp32 weight, 4 of gradient, 4 of
    DDP's gradient bucket (one process has none) and 8 of AdamW state. FSDP over N processes: 1/N of the base and of
    the adapter's 16 bytes, plus what is gathered while it computes: the root group (the embedding, kept whole
    through the forward and backward passes because it is also the output head) and either two blocks (the one
    computing and the one prefetched) or, before the first block, Gemma 4's per-layer embeddings, whichever is
    larger.
    `nf4` (QLoRA, one process or DDP): as `lora`, but the seven projections of every block in NF4 (NF4_BYTES a
    value); the embedding, norms, Gemma 4's experts and per-layer tables stay bf16.
    `full`: 16 bytes per parameter (fp32 master weight, gradient, two AdamW moments), 20 under DDP; FSDP: 1/N of
    those 16, plus the gathered bf16 weights as for LoRA and their unsharded fp32 gradients (the embedding's and one
    block's) before they are reduced.
    """
    n = parameter_counts(cfg, lora_r)
    if method == "full":
        if mode == "fsdp":
            gathered = 2 * n["embed"] + 2 * max(2 * n["block"], n["per_layer"])
            return (16 * n["total"] / processes + gathered + 4 * (n["embed"] + n["block"])) / _GB
        return (20 if processes > 1 else 16) * n["total"] / _GB
    adapter = 20 if processes > 1 and mode != "fsdp" else 16
    if method == "nf4":
        if mode == "fsdp":
            return None
        base = NF4_BYTES * n["projections"] + 2 * (n["total"] - n["projections"])
        return (base + adapter * n["lora"]) / _GB
    if mode == "fsdp":
        sharded = (2 * n["total"] + 16 * n["lora"]) / processes
        return (sharded + 2 * n["embed"] + 2 * max(2 * n["block"], n["per_layer"])) / _GB
    return (2 * n["total"] + adapter * n["lora"]) / _GB


def memory_table(names=PRESETS, lora_r: int = 16) -> str:
    """The README's tables of memory per GPU for each preset, as markdown: LoRA, then QLoRA (NF4) and full
    fine-tuning."""
    rows = [
        "| preset | base params | LoRA r16 params | 1 GPU | DDP, any N | FSDP 2 | FSDP 4 | FSDP 8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    more = [
        "| preset | QLoRA NF4, 1 GPU | QLoRA NF4, DDP | full, 1 GPU | full, DDP | full, FSDP 2 | full, FSDP 4 "
        "| full, FSDP 8 |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name in names:
        cfg = preset(name)
        n = parameter_counts(cfg, lora_r)
        cells = [memory_per_gpu(cfg, 1, "ddp", lora_r), memory_per_gpu(cfg, 2, "ddp", lora_r)]
        cells += [memory_per_gpu(cfg, k, "fsdp", lora_r) for k in (2, 4, 8)]
        rows.append(
            f"| {name} | {n['total'] / 1e9:.2f}B | {n['lora'] / 1e6:.1f}M | "
            + " | ".join(f"{c:.1f} GB" for c in cells)
            + " |"
        )
        cells = [memory_per_gpu(cfg, k, "ddp", lora_r, "nf4") for k in (1, 2)]
        cells += [memory_per_gpu(cfg, k, "ddp", lora_r, "full") for k in (1, 2)]
        cells += [memory_per_gpu(cfg, k, "fsdp", lora_r, "full") for k in (2, 4, 8)]
        more.append(f"| {name} | " + " | ".join(f"{c:.1f} GB" for c in cells) + " |")
    return "\n".join(rows) + "\n\n" + "\n".join(more)
