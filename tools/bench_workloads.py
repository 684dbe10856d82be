"""Benchmark workloads for tools/bench.py: greedy decoding and prefill, ours and transformers' (the reference), the
machine's memory read bandwidth, and peak memory. The LoRA SFT workload is tools/bench_train.py.

Each workload runs in a process of its own (tools/bench.py starts one per workload, implementation and repetition,
alternating ours and the reference) so that its peak memory is its own: RSS on CPU, `max_memory_allocated` on CUDA.
This module sits beside tools/bench.py, outside the packages, because it imports transformers (inside the
reference workloads only): gemma/, lora/ and train/ never do (tests/test_layering.py). tools/ is no package: the
bench and its workers run as `python tools/bench.py`, which puts tools/ first on sys.path, and the tests find it
through pyproject's `pythonpath`.
"""

from __future__ import annotations

import json
import math
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

from gemma.model.config import preset
from gemma.files import read_json_file

CACHE = Path.home() / ".cache" / "gemma-sft" / "bench"


# ---- measuring ------------------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device) -> float:
    """Seconds `fn()` takes, waiting for the device before and after."""
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def peak_memory(device: torch.device) -> int:
    """Peak bytes of this process so far: resident set on CPU, allocated tensor memory on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def read_bandwidth(device: torch.device, nbytes: int = 1 << 29, reps: int = 7) -> float:
    """Measured memory read bandwidth (bytes/s): the median time to sum a buffer far larger than the caches."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    buf.sum()  # touch it once
    times = [timed(buf.sum, device) for _ in range(reps)]
    del buf
    return nbytes / statistics.median(times)


def median(xs) -> float:
    return statistics.median(xs) if xs else math.nan


def emit(result: dict) -> None:
    """A worker's result: one JSON line on stdout, the last thing it prints."""
    sys.stdout.write("BENCH " + json.dumps(result) + "\n")
    sys.stdout.flush()


# ---- the models compared ----------------------------------------------------------------------------------------
#
# Both sides read the same HF folder: the real Gemma 3 270M converted once to bf16 (the default), or a preset's
# architecture with seeded random weights (`--size`), written once into the cache.


def real_270m_folder() -> Path:
    """An HF folder of the real Gemma 3 270M (bf16), converted once from whatever source `3-270m` resolves to."""
    folder = CACHE / "3-270m-hf"
    if not (folder / "config.json").exists():
        from gemma.formats.convert import convert

        convert("3-270m", folder, "hf", dtype=torch.bfloat16, force=True)
    return folder


def random_folder(size: str, seed: int = 0) -> Path:
    """An HF folder holding `size`'s architecture with seeded random bf16 weights (no tokenizer: the benchmarks
    feed token ids)."""
    from gemma.formats.checkpoint import atomic_dir, hf_names, save_safetensors
    from gemma.formats.hf_config import to_hf_config
    from gemma.model import Gemma

    cfg = preset(size)
    folder = CACHE / f"random-{size}-hf"
    if (folder / "config.json").exists():
        return folder
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        model = Gemma(cfg)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):  # around what the norm multiplies by at init (1 + w, or w for Gemma 4)
                p.normal_(1.0 - cfg.norm_offset, 0.1)
            elif name.endswith(("embed.weight", "moe.gate_up", "moe.down")):  # the experts start uninitialised
                p.normal_(0.0, 0.03)
            elif name.endswith(("router_scale", "expert_scale")):
                p.fill_(1.0)
    names = hf_names(cfg)
    state = {names[k]: v.contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(folder, force=True) as tmp:
        save_safetensors(state, tmp / "model.safetensors")
        (tmp / "config.json").write_text(json.dumps(to_hf_config(cfg), indent=2))
    return folder


def model_folder(source: str) -> Path:
    """An HF folder for `source`: 'random:PRESET' (seeded random weights), an HF folder as it is, or any other
    model source (`3-270m`, a native folder, a .gguf file, a repo id) converted once to a bf16 HF folder."""
    if source.startswith("random:"):
        return random_folder(source.split(":", 1)[1])
    if source == "3-270m":
        return real_270m_folder()
    path = Path(source)
    if (path / "config.json").exists():
        config = read_json_file(path / "config.json", "model config")  # a FIFO or malformed JSON: one line
        if isinstance(config, dict) and "model_type" in config:
            return path
    from gemma.formats.convert import convert

    slug = "".join(
        c if c.isalnum() or c in "-_." else "_" for c in str(path.expanduser().resolve() if path.exists() else source)
    )
    folder = CACHE / f"{slug.strip('_')[-80:]}-hf"
    if not (folder / "config.json").exists():
        convert(source, folder, "hf", dtype=torch.bfloat16, force=True)
    return folder


def ours(folder: Path, dtype: torch.dtype, device: torch.device, quantize: str | None = None, compile: bool = False):
    """Our model from an HF folder (no tokenizer needed), in eval mode."""
    from gemma.formats import checkpoint

    cfg, state = checkpoint.load_hf_folder(folder, dtype)
    model = checkpoint.build_model(cfg, state, device).eval()
    if quantize is not None:
        from gemma.model.quantize import quantize_model

        quantize_model(model, quantize)
    if compile:
        from gemma.model.compiled import compile_model

        compile_model(model)
    return model


def reference(folder: Path, dtype: torch.dtype, device: torch.device):
    """transformers' model from the same folder, in eval mode (SDPA attention, its default).

    from_pretrained leaves the weights in the safetensors file's memory map, which reads about 2x slower than
    ordinary memory in decoding on this machine; they are copied out here, as our loader does, so that the
    comparison measures the code and not where the weights happen to live."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():  # tied weights are one Parameter: copied once, still tied
            p.data = p.data.clone()
    return model.to(device).eval()


def weight_bytes(model) -> int:
    """Bytes of weights one decoding step reads: every parameter and buffer of the model (the tied embedding
    counted once: as the output head it is read whole every step; the KV cache is not a weight)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def prompt_ids(batch: int, length: int, vocab_size: int, seed: int = 0) -> torch.Tensor:
    """Seeded random ids (batch, length) in [3, min(20000, vocab)): ordinary tokens, no special ones."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, min(20000, vocab_size), (batch, length), generator=g)


# ---- workloads: each returns a dict of samples for the result JSON -----------------------------------------------
#
# Decoding is measured as the difference of two greedy generations from the same prompt, one of `new_tokens`
# tokens and one of a single token: (new_tokens - 1) decode steps, prefill and set-up cancelled out, the same way
# on both sides. tokens/s counts every row's tokens (batch x steps / s).


def _ours_generate(model, ids: torch.Tensor, new_tokens: int) -> None:
    from gemma.generation.sampling import SamplingParams
    from gemma.generation.steps import decode_steps

    B, T = ids.shape
    cache = model.new_cache(B, T + new_tokens)
    positions = torch.arange(T, device=ids.device).expand(B, T)
    for _ in decode_steps(model, cache, ids, positions, new_tokens, SamplingParams()):
        pass


def _reference_generate(model, ids: torch.Tensor, new_tokens: int) -> None:
    model.generate(
        ids,
        attention_mask=torch.ones_like(ids),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        pad_token_id=0,
    )


def decode_sampler(
    impl: str,
    folder: Path,
    *,
    batch: int,
    prompt_len: int = 32,
    new_tokens: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device,
    quantize: str | None = None,
    compile: bool = False,
):
    """(model, sample, first_s): `sample()` times one decode run and returns its tokens/s; `first_s` is the untimed
    warm-up run's time (with `compile`, the compilation)."""
    model = ours(folder, dtype, device, quantize, compile) if impl == "ours" else reference(folder, dtype, device)
    generate = _ours_generate if impl == "ours" else _reference_generate
    ids = prompt_ids(batch, prompt_len, model.config.vocab_size).to(device)
    with torch.inference_mode():
        first = timed(lambda: generate(model, ids, 4), device)  # warm-up

    def sample() -> float:
        with torch.inference_mode():
            t_one = timed(lambda: generate(model, ids, 1), device)
            t_all = timed(lambda: generate(model, ids, new_tokens), device)
        return batch * (new_tokens - 1) / max(t_all - t_one, 1e-9)

    return model, sample, first


def decode(
    impl: str,
    folder: Path,
    *,
    batch: int,
    prompt_len: int = 32,
    new_tokens: int = 64,
    runs: int = 3,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device,
    quantize: str | None = None,
    compile: bool = False,
) -> dict:
    load_start = time.perf_counter()
    model, sample, first = decode_sampler(
        impl,
        folder,
        batch=batch,
        prompt_len=prompt_len,
        new_tokens=new_tokens,
        dtype=dtype,
        device=device,
        quantize=quantize,
        compile=compile,
    )
    load_s = time.perf_counter() - load_start
    rates = [sample() for _ in range(runs)]
    peak = peak_memory(device)  # before the bandwidth probe's buffer
    bandwidth = read_bandwidth(device)
    nbytes = weight_bytes(model)
    # Each step reads the weights once for all rows: the bound is bandwidth / bytes steps per second.
    bound = bandwidth / nbytes * batch
    return {
        "tokens_per_s": rates,
        "peak_memory": peak,
        "weight_bytes": nbytes,
        "bandwidth": bandwidth,
        "bound_tokens_per_s": bound,
        "load_s": load_s,
        "first_s": first,
    }


def prefill_sampler(
    impl: str,
    folder: Path,
    *,
    prompt_len: int = 512,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device,
    quantize: str | None = None,
    compile: bool = False,
):
    """(model, sample, first_s) for one forward pass over a `prompt_len`-token prompt that fills the KV cache and
    returns the last position's logits: what generation does first (transformers: `logits_to_keep=1`, its own
    cache). `first_s` is the untimed first pass (with `compile`, the compilation)."""
    from gemma.generation.steps import prefill

    model = ours(folder, dtype, device, quantize, compile) if impl == "ours" else reference(folder, dtype, device)
    ids = prompt_ids(1, prompt_len, model.config.vocab_size, seed=1).to(device)
    if impl == "ours":
        positions = torch.arange(prompt_len, device=device)[None]
        step = lambda: prefill(model, model.new_cache(1, prompt_len + 1), ids, positions)  # noqa: E731
    else:
        step = lambda: model(ids, logits_to_keep=1, use_cache=True)  # noqa: E731

    def sample() -> float:
        with torch.inference_mode():
            return prompt_len / timed(step, device)

    with torch.inference_mode():
        first = timed(step, device)  # warm-up
    return model, sample, first


def prefill_run(
    impl: str,
    folder: Path,
    *,
    prompt_len: int = 512,
    runs: int = 5,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device,
    quantize: str | None = None,
    compile: bool = False,
) -> dict:
    _, sample, first = prefill_sampler(
        impl, folder, prompt_len=prompt_len, dtype=dtype, device=device, quantize=quantize, compile=compile
    )
    rates = [sample() for _ in range(runs)]
    return {"tokens_per_s": rates, "peak_memory": peak_memory(device), "first_s": first}


def paired(samplers: dict, runs: int) -> dict[str, list[float]]:
    """Each sampler's samples, taking turns run by run (the order flips every run).

    This machine's speed drifts by up to 2x from one minute, and one process, to the next; two implementations
    timed in turn in one process see the same drift, so the ratio of two samples taken back to back holds where
    separate processes' figures do not."""
    names = list(samplers)
    out: dict[str, list[float]] = {name: [] for name in names}
    for i in range(runs):
        for name in names if i % 2 == 0 else names[::-1]:
            out[name].append(samplers[name]())
    return out


def _greedy(model, prompt: list[int], new_tokens: int) -> list[int]:
    from gemma.generation.sampling import SamplingParams
    from gemma.generation.steps import decode_steps

    ids = torch.tensor([prompt], device=model.device)
    cache = model.new_cache(1, len(prompt) + new_tokens)
    positions = torch.arange(len(prompt), device=model.device)[None]
    return [step[0] for step in decode_steps(model, cache, ids, positions, new_tokens, SamplingParams())]


def _teacher_forced(model, prompt: list[int], continuation: list[int]) -> torch.Tensor:
    """The model's greedy choice at each position of `continuation`, given the true tokens before it."""
    ids = torch.tensor([prompt + continuation[:-1]], device=model.device)
    return model(ids)[0, len(prompt) - 1 :].argmax(-1).cpu()


def agreement(
    folder: Path,
    prompts: list[list[int]],
    *,
    new_tokens: int = 32,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device,
    quantize: str = "int8",
) -> dict:
    """How often the quantized model's greedy choice equals the unquantized one's, over `prompts`.

    - teacher_forced: at each of the `new_tokens` positions of the bf16 greedy continuation, given the same
      preceding tokens, the share of positions where the quantized model picks the same token. The same share for
      a float32 model against bf16 is reported beside it: the disagreement that rounding alone causes.
    - identical_prefix: the share of generated tokens before the quantized model's own greedy run first differs
      (one early difference makes the whole rest of a reply differ, so this is the stricter figure).
    """
    base, quant = ours(folder, dtype, device), ours(folder, dtype, device, quantize)
    full = ours(folder, torch.float32, device)
    same_q = same_f = prefix = total = whole = 0
    with torch.inference_mode():
        for prompt in prompts:
            ref = _greedy(base, prompt, new_tokens)
            want = torch.tensor(ref)
            same_q += int((_teacher_forced(quant, prompt, ref) == want).sum())
            same_f += int((_teacher_forced(full, prompt, ref) == want).sum())
            own = _greedy(quant, prompt, new_tokens)
            first = next((i for i, (a, b) in enumerate(zip(ref, own)) if a != b), len(ref))
            prefix += first
            whole += first == len(ref)
            total += len(ref)
    return {
        "prompts": len(prompts),
        "tokens": total,
        "teacher_forced": same_q / total,
        "teacher_forced_fp32": same_f / total,
        "identical_prefix": prefix / total,
        "identical_replies": whole / len(prompts),
        "peak_memory": peak_memory(device),
    }


# ---- llama.cpp: the int4 comparison -----------------------------------------------------------------------------


def llama_cpp_gguf(folder: Path) -> Path:
    """The HF folder exported by our GGUF writer in Q4_0 (cached, by the folder's path, until the folder changes):
    the file llama.cpp runs."""
    import hashlib

    folder = folder.resolve()
    path = CACHE / f"{folder.name}-{hashlib.sha1(str(folder).encode()).hexdigest()[:10]}-q4_0.gguf"
    newest = max(f.stat().st_mtime for f in folder.iterdir())
    if not path.exists() or path.stat().st_mtime < newest:
        from gemma.formats.convert import convert

        convert(folder, path, "gguf", gguf_dtype="q4_0", force=True)
    return path


def llama_cpp_sampler(folder: Path, *, prompt_len: int = 32, new_tokens: int = 64, vocab_size: int):
    """(model, sample, first_s) for greedy decoding at batch 1 through llama-cpp-python on the Q4_0 export, with as
    many threads as torch uses, timed as ours: a `new_tokens` generation minus a 1-token one from the same prompt.
    `model` is the file's size in bytes (its weights, near enough, for the bandwidth bound)."""
    from llama_cpp import Llama

    path = llama_cpp_gguf(folder)
    threads = torch.get_num_threads()
    llm = Llama(
        model_path=str(path),
        n_ctx=prompt_len + new_tokens + 16,
        n_batch=512,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )
    ids = prompt_ids(1, prompt_len, vocab_size)[0].tolist()

    def generate(n: int) -> None:
        tokens = llm.generate(ids, temp=0.0, reset=True)  # greedy; the prompt's cache is reused, as in both runs
        for _ in range(n):
            next(tokens)

    cpu = torch.device("cpu")
    first = timed(lambda: generate(4), cpu)

    def sample() -> float:
        t_one = timed(lambda: generate(1), cpu)
        t_all = timed(lambda: generate(new_tokens), cpu)
        return (new_tokens - 1) / max(t_all - t_one, 1e-9)

    sample.close = llm.close  # before the interpreter's shutdown, where llama-cpp-python's own finaliser fails
    return path.stat().st_size, sample, first


def llama_cpp_decode(folder: Path, *, prompt_len: int = 32, new_tokens: int = 64, runs: int = 3, vocab_size: int):
    nbytes, sample, first = llama_cpp_sampler(
        folder, prompt_len=prompt_len, new_tokens=new_tokens, vocab_size=vocab_size
    )
    rates = [sample() for _ in range(runs)]
    sample.close()
    return {
        "tokens_per_s": rates,
        "peak_memory": peak_memory(torch.device("cpu")),
        "weight_bytes": nbytes,
        "first_s": first,
    }


# ---- the serving engine: 8 concurrent requests against 1 ----------------------------------------------------------


def serve_samplers(
    folder: Path,
    *,
    prompt_len: int = 32,
    new_tokens: int = 64,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device,
    quantize: str | None = None,
    compile: bool = False,
):
    """{'ours': 8 clients, 'reference': 1 client}: each `sample()` hands the engine that many requests at once
    (different prompts of `prompt_len` tokens, `new_tokens` each, no stop ids) and returns the tokens/s of the
    whole engine, prefill included, until the last one is done."""
    from gemma.generation.engine import Engine
    from gemma.tokenizer import Tokenizer

    model = ours(folder, dtype, device, quantize, compile)
    engine = Engine(model, Tokenizer(folder / "tokenizer.model"), max_batch=8, max_len=prompt_len + new_tokens + 8)
    prompts = prompt_ids(8, prompt_len, model.config.vocab_size).tolist()

    def clients(n: int):
        def sample() -> float:
            start = time.perf_counter()
            finishes = engine.run_all(prompts[:n], max_new_tokens=new_tokens, stop_ids=())
            return sum(f.completion_tokens for f in finishes) / (time.perf_counter() - start)

        return sample

    start = time.perf_counter()
    clients(8)()  # warm-up (with `compile`, the compilation)
    first = time.perf_counter() - start
    return {"ours": clients(8), "reference": clients(1)}, first
