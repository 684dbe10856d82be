"""Performance side by side with transformers (+ peft) and llama.cpp, in one run.

    python tools/bench.py [--model SRC | --size PRESET] [--device cpu|cuda] [--quantize int8,int4] [--compile]
                          [--only decode1,decode8,prefill,sft,serve8] [--reps 3] [--out bench.json]
                          [--readme README.md]
    python tools/bench.py --from bench.json --readme README.md      # the README's table from an earlier run

Workloads: greedy decoding at batch 1 and 8 (tokens/s, and as a fraction of the memory-bandwidth bound: weight
bytes read per step / the best read bandwidth measured in the run), prefill of a 512-token prompt, a LoRA SFT step
(r 16, all seven projections, bf16) at the same tokens per step, and the serving engine with 8 requests at once
against 1 (ours against ours). For speed, the two sides take turns run by run in one process, `--reps` processes
per workload (this machine's speed drifts by up to 2x between minutes and between processes; turns in one process
see the same drift): the speed ratio is the median, over every turn of every process, of ours' rate over the
reference's in that turn. Peak memory (RSS on CPU, max_memory_allocated on CUDA) comes from each implementation
alone in a fresh process. With --quantize our int8- / int4-weight model is also measured (against transformers in
--dtype) and its greedy choices are compared with the unquantized model's; int4 decoding at batch 1 is also
measured against llama.cpp (llama-cpp-python) running our GGUF export of the same model in Q4_0. With --compile our
decoding (the static-shape step, gemma.model.static_decode), prefill and serving are also measured compiled (the
compilation is left out of the timing, reported apart). Each variant is its own row, so what each change gains is
its row against the plain one ("gain").

The default model is the real Gemma 3 270M, converted once to a bf16 HF folder under ~/.cache/gemma-sft/bench;
--size PRESET benchmarks that architecture with seeded random weights instead (no tokenizer: no serving, agreement
or llama.cpp rows). --readme FILE writes the results into FILE's Performance table, between its
`<!-- bench:begin -->` and `<!-- bench:end -->` lines.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from gemma.cli import DTYPES, main_guard, parse_dtype
from gemma.errors import GemmaError
from gemma.files import check_source_file, read_json_file, refuse_overwriting_inputs
from gemma.writing import check_writable, finite_json, write_atomically

import bench_report as report

# The workloads, bench_workloads (decoding, prefill, int8 agreement) and bench_train (the SFT step), are modules
# beside this file, outside the packages, which never import transformers or peft. They are imported by name, in
# the functions that run them (--help and the refusals load no torch): tools/ is first on sys.path when this file
# runs, its worker processes included, and the tests get it from pyproject's pytest `pythonpath`.

WORKLOADS = ("decode1", "decode8", "prefill", "sft", "serve8")
QUANTIZE = ("int8", "int4")
EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "general_zh_en.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    src = p.add_mutually_exclusive_group()
    src.add_argument(
        "--model",
        default="3-270m",
        help="HF folder or any model source (converted once to a bf16 HF folder); default 3-270m",
    )
    src.add_argument("--size", metavar="PRESET", default=None, help="a preset's architecture with random weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", choices=DTYPES, default="bf16", help="weights and compute dtype (default bf16)")
    p.add_argument(
        "--quantize", default="", metavar="MODES", help="comma list of int8,int4: also measure those weights of ours"
    )
    p.add_argument("--compile", action="store_true", help="also measure our decoding and prefill with torch.compile")
    p.add_argument("--only", default=",".join(WORKLOADS), help=f"comma list of {','.join(WORKLOADS)}")
    p.add_argument("--reps", type=int, default=3, help="processes per workload and implementation (default 3)")
    p.add_argument("--runs", type=int, default=3, help="timed runs in each process (default 3)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per decode run (default 64)")
    p.add_argument("--prompt-len", type=int, default=512, help="prefill prompt length (default 512)")
    p.add_argument("--sft-batch", type=int, default=4, help="sequences per SFT step (default 4)")
    p.add_argument("--sft-len", type=int, default=256, help="tokens per SFT sequence (default 256)")
    p.add_argument("--sft-steps", type=int, default=3, help="timed SFT steps per process (default 3)")
    p.add_argument(
        "--agree-prompts",
        type=int,
        default=16,
        help="prompts for the quantized agreement check (from examples/general_zh_en.jsonl; default 16)",
    )
    p.add_argument("--out", default="bench.json", help="where to write the JSON results (default bench.json)")
    p.add_argument("--readme", default=None, metavar="FILE", help="write the results into FILE's Performance table")
    p.add_argument("--from", dest="from_json", default=None, metavar="JSON", help="no run: --readme from this JSON")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in only if w not in WORKLOADS]
    if bad or not only:
        p.error(f"--only: unknown workload {bad[0]!r}; choose from {','.join(WORKLOADS)}" if bad else "--only is empty")
    args.only = only
    args.quantize = [q.strip() for q in args.quantize.split(",") if q.strip()]
    bad = [q for q in args.quantize if q not in QUANTIZE]
    if bad:
        p.error(f"--quantize: unknown mode {bad[0]!r}; choose from {','.join(QUANTIZE)}")
    if args.from_json and not args.readme:
        p.error("--from goes with --readme")
    for flag in ("reps", "runs", "new_tokens", "prompt_len", "sft_batch", "sft_len", "sft_steps"):
        if getattr(args, flag) < (2 if flag == "new_tokens" else 1):
            p.error(f"--{flag.replace('_', '-')} is too small")
    return args


# ---- a worker: one workload, one implementation, in this process ------------------------------------------------


def run_worker(spec: dict) -> None:
    """One workload in this process: both sides taking turns (`pair`, for speed), or one alone (for its peak memory
    and, decoding, the weight bytes of the bandwidth bound). Every process also probes the read bandwidth."""
    import torch

    import bench_workloads as workloads

    device, dtype = torch.device(spec["device"]), parse_dtype(spec["dtype"])
    folder, kind = Path(spec["folder"]), spec["kind"]
    if spec.get("pair"):
        if kind == "serve8":
            samplers, _ = workloads.serve_samplers(
                folder,
                new_tokens=spec["new_tokens"],
                dtype=dtype,
                device=device,
                quantize=spec.get("quantize"),
                compile=spec.get("compile", False),
            )
        else:
            samplers = {impl: _sampler(spec, impl, folder, device, dtype) for impl in ("ours", "reference")}
        runs = {"prefill": 3 * spec["runs"], "sft": spec["sft_steps"]}.get(kind, 2 * spec["runs"])
        result = workloads.paired(samplers, runs)
        for sample in samplers.values():
            getattr(sample, "close", lambda: None)()
        workloads.emit({**result, "bandwidth": workloads.read_bandwidth(device)})
        return
    impl, quantize = spec["impl"], spec.get("quantize")
    if kind in ("decode1", "decode8") and spec.get("reference") == "llama.cpp" and impl == "reference":
        result = workloads.llama_cpp_decode(
            folder, new_tokens=spec["new_tokens"], runs=spec["runs"], vocab_size=_vocab_size(folder)
        )
    elif kind in ("decode1", "decode8"):
        result = workloads.decode(
            impl,
            folder,
            batch=1 if kind == "decode1" else 8,
            new_tokens=spec["new_tokens"],
            runs=spec["runs"],
            dtype=dtype,
            device=device,
            quantize=quantize,
            compile=spec.get("compile", False),
        )
    elif kind == "prefill":
        result = workloads.prefill_run(
            impl,
            folder,
            prompt_len=spec["prompt_len"],
            runs=spec["runs"],
            dtype=dtype,
            device=device,
            compile=spec.get("compile", False),
        )
    elif kind == "sft":
        from bench_train import sft

        result = sft(
            impl, folder, batch=spec["sft_batch"], seq_len=spec["sft_len"], steps=spec["sft_steps"], device=device
        )
    elif kind == "agreement":
        result = workloads.agreement(folder, spec["prompts"], dtype=dtype, device=device, quantize=quantize)
    else:
        raise ValueError(kind)
    workloads.emit({"bandwidth": workloads.read_bandwidth(device), **result})


def _sampler(spec: dict, impl: str, folder: Path, device, dtype):
    """One side's timed-run function for `spec`'s workload: the variant (int8, int4, compile) is ours only; the
    reference is transformers, or llama.cpp where the spec says so."""
    import bench_workloads as workloads

    kind = spec["kind"]
    variant = {"quantize": spec.get("quantize"), "compile": spec.get("compile", False)} if impl == "ours" else {}
    if kind in ("decode1", "decode8") and impl == "reference" and spec.get("reference") == "llama.cpp":
        return workloads.llama_cpp_sampler(folder, new_tokens=spec["new_tokens"], vocab_size=_vocab_size(folder))[1]
    if kind in ("decode1", "decode8"):
        return workloads.decode_sampler(
            impl,
            folder,
            batch=1 if kind == "decode1" else 8,
            new_tokens=spec["new_tokens"],
            dtype=dtype,
            device=device,
            **variant,
        )[1]
    if kind == "prefill":
        return workloads.prefill_sampler(
            impl, folder, prompt_len=spec["prompt_len"], dtype=dtype, device=device, **variant
        )[1]
    if kind == "sft":
        from bench_train import sft_sampler

        return sft_sampler(impl, folder, batch=spec["sft_batch"], seq_len=spec["sft_len"], device=device)[0]
    raise ValueError(kind)


def _vocab_size(folder: Path) -> int:
    """The HF folder's vocabulary size (llama.cpp's side draws its prompt ids from it, as ours does)."""
    return json.loads((folder / "config.json").read_text())["vocab_size"]


def spawn(spec: dict) -> dict:
    """Run one workload in a fresh process; its result."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        who = spec.get("impl", "paired")
        raise GemmaError(f"the {who} {spec['kind']} workload failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len("BENCH ") :])


# ---- the run --------------------------------------------------------------------------------------------------


def agreement_prompts(folder: Path, n: int) -> list[list[int]]:
    """The first `n` instructions of examples/general_zh_en.jsonl, as chat prompts (the user turn only)."""
    from gemma.tokenizer import Tokenizer
    from train.data import read_records, record_messages

    tokenizer = Tokenizer(folder / "tokenizer.model")
    prompts = []
    for i, record in enumerate(read_records(EXAMPLES)[:n]):
        turns = record_messages(record, f"{EXAMPLES}: record {i + 1}")
        prompts.append(tokenizer.apply_chat([m for m in turns if m["role"] != "model"][:2]))
    return prompts


def machine(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
        "cpu_flags": _cpu_flags(),
    }
    for name in ("transformers", "peft", "llama_cpp"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpuinfo(field: str) -> str:
    """A field of /proc/cpuinfo's first processor ('' where there is none)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(field):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_name() -> str:
    return _cpuinfo("model name") or platform.processor()


def _cpu_flags() -> list[str]:
    """The CPU features that decide which matrix kernels are fast here (AMX, avx512_bf16, ...)."""
    have = set(_cpuinfo("flags").split())
    return [f for f in ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_int8") if f in have]


def plan_rows(args, folder: Path) -> list[dict]:
    """Every row of the run: {key, kind, variant}. A variant row compares a variant of ours (int8, int4, compiled)
    with the reference's plain model; int4 decoding at batch 1 is also compared with llama.cpp. Rows that need the
    tokenizer (serving) or a GGUF export with it (llama.cpp) are left out without one."""
    tokenizer = (folder / "tokenizer.model").exists()
    compiles = [False, True] if args.compile else [False]
    decode = [w for w in args.only if w.startswith("decode")]
    plan = []
    for kind in args.only:
        if kind == "serve8" and not tokenizer:
            continue
        for quantize in [None, *args.quantize] if kind in ("decode1", "decode8") else [None]:
            for compiled in compiles if kind != "sft" else [False]:
                variant = {k: v for k, v in (("quantize", quantize), ("compile", compiled)) if v}
                plan.append({"key": row_key(kind, variant), "kind": kind, "variant": variant})
    if "int4" in args.quantize and "decode1" in decode and tokenizer and _llama_cpp_ready(folder):
        for compiled in compiles:
            variant = {"quantize": "int4", "reference": "llama.cpp", **({"compile": True} if compiled else {})}
            plan.append({"key": row_key("decode1", variant), "kind": "decode1", "variant": variant})
    return plan


def _llama_cpp_ready(folder: Path) -> bool:
    """Whether llama.cpp can run here: llama-cpp-python installed, and the model exported to Q4_0 (done now, once)."""
    import importlib.util

    import bench_workloads as workloads

    if importlib.util.find_spec("llama_cpp") is None:
        print("[llama-cpp-python is not installed: no llama.cpp rows]", file=sys.stderr)
        return False
    try:
        workloads.llama_cpp_gguf(folder)
    except GemmaError as exc:
        print(f"[no llama.cpp rows: {exc}]", file=sys.stderr)
        return False
    return True


def row_key(kind: str, variant: dict) -> str:
    """'int4-compiled-decode1-llama.cpp' for decode1 with int4 and compile against llama.cpp."""
    parts = [variant.get("quantize"), "compiled" if variant.get("compile") else None, kind, variant.get("reference")]
    return "-".join(p for p in parts if p)


def measure(plan: list[dict], base: dict, reps: int) -> dict:
    """Every row's figures: speed from both sides in one process, taking turns, `reps` processes per row; peak
    memory (and decoding's weight bytes) from each side alone in a process, once per row; the bandwidth bound from
    the best read bandwidth any of those processes measured (one figure for every row)."""
    pairs: dict = {row["key"]: [] for row in plan}
    for rep in range(reps):
        for row in plan:
            print(f"[{rep + 1}/{reps}] {report.label(row['key'])}: both sides in turn ...", file=sys.stderr, flush=True)
            pairs[row["key"]].append(spawn({**base, "kind": row["kind"], "pair": True, **row["variant"]}))

    def alone_spec(kind: str, impl: str, variant: dict) -> dict:
        mine = {k: v for k, v in variant.items() if (k != "reference") == (impl == "ours")}
        return {**base, "runs": 1, "kind": kind, "impl": impl, **mine}

    alone: dict = {}  # by spec: a variant row's reference is the plain row's
    for row in plan:
        if row["kind"] == "serve8":  # ours against ours: the decode rows give its memory
            continue
        for impl in ("ours", "reference"):
            spec = alone_spec(row["kind"], impl, row["variant"])
            if json.dumps(spec, sort_keys=True) not in alone:
                print(f"[memory] {report.label(row['key'])}: {impl} alone ...", file=sys.stderr, flush=True)
                alone[json.dumps(spec, sort_keys=True)] = spawn(spec)
    probes = [p["bandwidth"] for ps in pairs.values() for p in ps] + [a["bandwidth"] for a in alone.values()]
    bandwidth = max(probes)
    results = {}
    for row in plan:
        key, kind = row["key"], row["kind"]
        out = results[key] = {"label": report.label(key), "against": report.against(key)}
        for impl in ("ours", "reference"):
            samples = [x for pair in pairs[key] for x in pair[impl]]
            merged = {"tokens_per_s": samples, "median": median(samples), "processes": [p[impl] for p in pairs[key]]}
            if kind != "serve8":
                one = alone[json.dumps(alone_spec(kind, impl, row["variant"]), sort_keys=True)]
                merged.update(peak_memory=one["peak_memory"], alone=one)
                for name in ("weight_bytes", "first_s"):
                    if name in one:
                        merged[name] = one[name]
                if "weight_bytes" in one:  # each step reads the weights once for all rows
                    batch = 8 if kind == "decode8" else 1
                    merged["bound_tokens_per_s"] = bandwidth / one["weight_bytes"] * batch
            out[impl] = merged
        # The speed ratio: the median over every turn of every process of ours' rate over the reference's in that
        # turn (the two ran back to back, so a drift of the machine's speed cancels out).
        out["speed"] = median([o / r for pair in pairs[key] for o, r in zip(pair["ours"], pair["reference"])])
    return {"results": results, "bandwidth": bandwidth, "bandwidth_probes": probes}


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else float("nan")


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker))
        return 0
    if args.from_json:
        check_source_file(args.from_json)
        saved = read_json_file(Path(args.from_json), "bench results")
        if not isinstance(saved, dict) or not isinstance(saved.get("results"), dict) or "machine" not in saved:
            raise GemmaError(f"{args.from_json}: not the JSON of a tools/bench.py run (no results and machine)")
        report.write_readme(Path(args.readme), saved)
        print(f"[wrote {args.readme}'s Performance table from {args.from_json}]", file=sys.stderr)
        return 0
    import bench_workloads as workloads

    # The outputs are tried, and kept off every input, before the (long) run.
    inputs = {"--model": None if args.size else args.model}
    if args.quantize:
        inputs["the agreement prompts"] = EXAMPLES
    refuse_overwriting_inputs({"--out": args.out}, inputs)
    check_writable(args.out, "--out")
    if args.readme:
        report.check_readme(Path(args.readme))
    if not args.size:
        check_source_file(args.model)
    started = time.time()
    source = f"random:{args.size}" if args.size else args.model
    print(f"[preparing {source} ...]", file=sys.stderr, flush=True)
    folder = workloads.model_folder(source)
    tokenizer = (folder / "tokenizer.model").exists()
    base = {
        "folder": str(folder),
        "device": args.device,
        "dtype": args.dtype,
        "runs": args.runs,
        "new_tokens": args.new_tokens,
        "prompt_len": args.prompt_len,
        "sft_batch": args.sft_batch,
        "sft_len": args.sft_len,
        "sft_steps": args.sft_steps,
    }
    measured = measure(plan_rows(args, folder), base, args.reps)
    agreement = {}
    for mode in args.quantize if tokenizer else []:
        print(f"[{mode} agreement ...]", file=sys.stderr, flush=True)
        prompts = agreement_prompts(folder, args.agree_prompts)
        agreement[mode] = spawn({**base, "kind": "agreement", "impl": "ours", "quantize": mode, "prompts": prompts})
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "folder": str(folder),
        "machine": machine(args.device),
        "settings": {**base, "reps": args.reps, "quantize": args.quantize, "compile": args.compile},
        **measured,
        "agreement": agreement,
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    write_atomically(out, json.dumps(finite_json(result), indent=2, allow_nan=False) + "\n")
    print(report.text(result))
    if args.readme:
        report.write_readme(Path(args.readme), result)
    print(f"[wrote {out} in {result['seconds']:.0f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
