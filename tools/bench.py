"""Performance side by side with transformers (+ peft), in one run.

    python tools/bench.py [--model SRC | --size PRESET] [--device cpu|cuda] [--quantize int8] [--compile]
                          [--only decode1,decode8,prefill,sft] [--reps 3] [--out bench.json]

Workloads: greedy decoding at batch 1 and 8 (tokens/s, and as a fraction of the memory-bandwidth bound: weight
bytes read per step / measured read bandwidth), prefill of a 512-token prompt, and a LoRA SFT step (r 16, all seven
projections, bf16) at the same tokens per step. For speed, ours and the reference take turns run by run in one
process, `--reps` processes per workload (this machine's speed drifts by up to 2x between minutes and between
processes; turns in one process see the same drift): the speed ratio is the median, over every turn of every
process, of ours' rate over the reference's in that turn. Peak memory (RSS on CPU, max_memory_allocated on CUDA)
comes from each implementation alone in a fresh process. With --quantize int8 our int8-weight model is also
measured (against transformers in --dtype) and its greedy choices are compared with the unquantized model's. With
--compile our prefill is also measured with gemma.model.compiled (torch.compile of the elementwise work; the
compilation is left out of the timing, reported apart).

The default model is the real Gemma 3 270M, converted once to a bf16 HF folder under ~/.cache/gemma-sft/bench;
--size PRESET benchmarks that architecture with seeded random weights instead.
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
from gemma.files import check_source_file, refuse_overwriting_inputs
from gemma.writing import check_writable, finite_json, write_atomically

# The workloads, bench_workloads (decoding, prefill, int8 agreement) and bench_train (the SFT step), are modules
# beside this file, outside the packages, which never import transformers or peft. They are imported by name, in
# the functions that run them (--help and the refusals load no torch): tools/ is first on sys.path when this file
# runs, its worker processes included, and the tests get it from pyproject's pytest `pythonpath`.

WORKLOADS = ("decode1", "decode8", "prefill", "sft")
LABELS = {
    "decode1": "greedy decode, batch 1",
    "decode8": "greedy decode, batch 8",
    "prefill": "prefill",
    "sft": "LoRA SFT step",
}
TARGETS = {  # speed ratios the project aims for (issue 20), by row
    "compiled-decode1": 2.0,
    "compiled-decode8": 1.5,
    "prefill": 1.3,
    "compiled-prefill": 1.3,
    "sft": 2.5,
    "int8-compiled-decode1": 2.5,
}
MEMORY_TARGETS = {"sft": 0.35}
BOUND_TARGETS = {"compiled-decode1": 0.75}  # the share of the bandwidth bound
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
    p.add_argument("--quantize", choices=("int8",), default=None, help="also measure our int8-weight model")
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
        help="prompts for the int8 agreement check (from examples/general_zh_en.jsonl; default 16)",
    )
    p.add_argument("--out", default="bench.json", help="where to write the JSON results (default bench.json)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    only = [w.strip() for w in args.only.split(",") if w.strip()]
    bad = [w for w in only if w not in WORKLOADS]
    if bad or not only:
        p.error(f"--only: unknown workload {bad[0]!r}; choose from {','.join(WORKLOADS)}" if bad else "--only is empty")
    args.only = only
    for flag in ("reps", "runs", "new_tokens", "prompt_len", "sft_batch", "sft_len", "sft_steps"):
        if getattr(args, flag) < (2 if flag == "new_tokens" else 1):
            p.error(f"--{flag.replace('_', '-')} is too small")
    return args


# ---- a worker: one workload, one implementation, in this process ------------------------------------------------


def run_worker(spec: dict) -> None:
    """One workload in this process: both implementations taking turns (`pair`, for speed), or one alone (for its
    peak memory and, decoding, the bandwidth bound)."""
    import torch

    import bench_workloads as workloads

    device, dtype = torch.device(spec["device"]), parse_dtype(spec["dtype"])
    folder, kind = Path(spec["folder"]), spec["kind"]
    if spec.get("pair"):
        samplers = {impl: _sampler(spec, impl, folder, device, dtype) for impl in ("ours", "reference")}
        runs = {"prefill": 3 * spec["runs"], "sft": spec["sft_steps"]}.get(kind, 2 * spec["runs"])
        workloads.emit(workloads.paired(samplers, runs))
        return
    impl, quantize = spec["impl"], spec.get("quantize")
    if kind in ("decode1", "decode8"):
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
    workloads.emit(result)


def _sampler(spec: dict, impl: str, folder: Path, device, dtype):
    """One implementation's timed-run function for `spec`'s workload; the variant (int8, compile) is ours only."""
    import bench_workloads as workloads

    kind = spec["kind"]
    variant = {"quantize": spec.get("quantize"), "compile": spec.get("compile", False)} if impl == "ours" else {}
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


def spawn(spec: dict) -> dict:
    """Run one workload in a fresh process; its result."""
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)], capture_output=True, text=True
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise GemmaError(f"the {spec['impl']} {spec['kind']} workload failed (exit {proc.returncode}):\n{tail}")
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


def median(xs):
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2 if xs else float("nan")


def machine(device: str) -> dict:
    import torch

    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": _cpu_name(),
    }
    for name in ("transformers", "peft"):
        try:
            info[name] = __import__(name).__version__
        except ImportError:
            info[name] = None
    if device.startswith("cuda"):
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _bound(side: dict, target: float | None = None) -> str:
    """A decoding side's share of its bandwidth bound, checked against `target` (blank where there is none)."""
    if "bound_tokens_per_s" not in side:
        return ""
    share = side["median"] / side["bound_tokens_per_s"]
    return f"{share:.0%}" + ((" ok" if share >= target else " MISSED") if target else "")


def table(results: dict) -> str:
    head = (
        "workload",
        "ours",
        "transformers",
        "speed",
        "target",
        "ours peak",
        "ref peak",
        "memory",
        "ours/bound",
        "ref/bound",
    )
    rows = [head]
    for key, r in results.items():
        o, ref = r["ours"], r["reference"]
        speed = r["speed"]
        mem = o["peak_memory"] / ref["peak_memory"]
        unit = "tok/s"
        target = TARGETS.get(key)
        mem_target = MEMORY_TARGETS.get(key)
        bound_target = BOUND_TARGETS.get(key)
        rows.append(
            (
                r["label"],
                f"{o['median']:.1f} {unit}",
                f"{ref['median']:.1f} {unit}",
                f"{speed:.2f}x",
                (f">={target}x " + ("ok" if speed >= target else "MISSED")) if target else "",
                gb(o["peak_memory"]),
                gb(ref["peak_memory"]),
                f"{mem:.2f}x" + ((" ok" if mem <= mem_target else " MISSED") if mem_target else ""),
                _bound(o, bound_target),
                _bound(ref),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


@main_guard
def plan_rows(args) -> list[tuple[str, str, dict]]:
    """(key, kind, variant) of each row: the int8 and compiled rows compare a variant of ours with transformers'
    plain model."""
    plan = [(w, w, {}) for w in args.only]
    decode = [w for w in args.only if w.startswith("decode")]
    if args.compile:
        plan += [(f"compiled-{w}", w, {"compile": True}) for w in decode]
    if args.quantize:
        plan += [(f"{args.quantize}-{w}", w, {"quantize": args.quantize}) for w in decode]
        if args.compile:
            plan += [(f"{args.quantize}-compiled-{w}", w, {"quantize": args.quantize, "compile": True}) for w in decode]
    if args.compile and "prefill" in args.only:
        plan += [("compiled-prefill", "prefill", {"compile": True})]
    return plan


def label(key: str) -> str:
    """A row's label: 'int8 decode, batch 1, --compile' for the key 'int8-compiled-decode1'."""
    *variant, kind = key.split("-")
    quantize = [v for v in variant if v != "compiled"]
    text = LABELS[kind]
    if quantize:
        text = f"{quantize[0]} {text.removeprefix('greedy ')}"
    return text + (", --compile" if "compiled" in variant else "")


def measure(plan: list[tuple[str, str, dict]], base: dict, reps: int) -> dict:
    """Every row's figures: speed from both implementations in one process, taking turns, `reps` processes per
    row; peak memory (and decoding's bandwidth bound) from each implementation alone in a process, once per row."""
    pairs: dict = {key: [] for key, _, _ in plan}
    for rep in range(reps):
        for key, kind, variant in plan:
            print(f"[{rep + 1}/{reps}] {label(key)}: ours and transformers in turn ...", file=sys.stderr, flush=True)
            pairs[key].append(spawn({**base, "kind": kind, "pair": True, **variant}))

    def alone_spec(kind: str, impl: str, variant: dict) -> dict:
        return {**base, "runs": 1, "kind": kind, "impl": impl, **(variant if impl == "ours" else {})}

    alone: dict = {}  # by spec: a variant row's reference is the plain row's
    for key, kind, variant in plan:
        for impl in ("ours", "reference"):
            spec = alone_spec(kind, impl, variant)
            if json.dumps(spec, sort_keys=True) not in alone:
                print(f"[memory] {label(key)}: {impl} alone ...", file=sys.stderr, flush=True)
                alone[json.dumps(spec, sort_keys=True)] = spawn(spec)
    results = {}
    for key, kind, variant in plan:
        row = results[key] = {"label": label(key)}
        for impl in ("ours", "reference"):
            one = alone[json.dumps(alone_spec(kind, impl, variant), sort_keys=True)]
            samples = [x for pair in pairs[key] for x in pair[impl]]
            merged = {
                "tokens_per_s": samples,
                "median": median(samples),
                "peak_memory": one["peak_memory"],
                "processes": [pair[impl] for pair in pairs[key]],
                "alone": one,
            }
            for name in ("bound_tokens_per_s", "weight_bytes", "bandwidth", "first_s"):
                if name in one:
                    merged[name] = one[name]
            row[impl] = merged
        # The speed ratio: the median over every round of every process of ours' rate over the reference's in that
        # round (the two ran back to back, so a drift of the machine's speed cancels out).
        row["speed"] = median([o / r for pair in pairs[key] for o, r in zip(pair["ours"], pair["reference"])])
    return results


def print_report(args, source: str, report: dict) -> None:
    results, agree = report["results"], report["agreement"]
    print(
        f"{source} on {args.device} ({args.dtype}), {args.reps} processes per workload, ours and transformers "
        f"taking turns in each (decode {2 * args.runs}, prefill {3 * args.runs}, SFT {args.sft_steps} turns); "
        f"{report['machine']['cpu']}, torch {report['machine']['torch']}, "
        f"transformers {report['machine']['transformers']}, peft {report['machine']['peft']}"
    )
    print(table(results))
    compiled = {key: r["ours"]["first_s"] for key, r in results.items() if "compiled" in key and "first_s" in r["ours"]}
    if compiled:
        firsts = ", ".join(f"{label(key)} {first:.1f}s" for key, first in compiled.items())
        print(f"--compile: the first run of each process (compiling) took {firsts}; later ones are the figures above")
    if agree:
        print(
            f"{args.quantize} greedy agreement with {args.dtype} over {agree['prompts']} prompts x "
            f"{agree['tokens'] // agree['prompts']} tokens: same choice at {agree['teacher_forced']:.1%} of "
            f"positions given the same context (fp32 vs {args.dtype}: {agree['teacher_forced_fp32']:.1%}); "
            f"free-running, {agree['identical_prefix']:.1%} of tokens before the first difference, "
            f"{agree['identical_replies']:.0%} of replies identical"
        )


@main_guard
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.worker is not None:
        run_worker(json.loads(args.worker))
        return 0
    import bench_workloads as workloads

    # The output is tried, and kept off every input, before the (long) run.
    inputs = {"--model": None if args.size else args.model}
    if args.quantize:
        inputs["the agreement prompts"] = EXAMPLES
    refuse_overwriting_inputs({"--out": args.out}, inputs)
    check_writable(args.out, "--out")
    if not args.size:
        check_source_file(args.model)
    started = time.time()
    source = f"random:{args.size}" if args.size else args.model
    print(f"[preparing {source} ...]", file=sys.stderr, flush=True)
    folder = workloads.model_folder(source)
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
    results = measure(plan_rows(args), base, args.reps)
    agree = None
    if args.quantize and (folder / "tokenizer.model").exists():
        print("[int8 agreement ...]", file=sys.stderr, flush=True)
        agree = spawn(
            {
                **base,
                "kind": "agreement",
                "impl": "ours",
                "quantize": args.quantize,
                "prompts": agreement_prompts(folder, args.agree_prompts),
            }
        )
    report = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "source": source,
        "folder": str(folder),
        "machine": machine(args.device),
        "settings": {**base, "reps": args.reps},
        "results": results,
        "agreement": agree,
        "seconds": round(time.time() - started, 1),
    }
    out = Path(args.out)
    write_atomically(out, json.dumps(finite_json(report), indent=2, allow_nan=False) + "\n")
    print_report(args, source, report)
    print(f"[wrote {out} in {report['seconds']:.0f}s]", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
