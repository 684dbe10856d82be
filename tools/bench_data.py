"""The data pipeline at scale: how fast a large instruction set is encoded into the tokenize-once cache, and how
fast (and in how much memory) `python -m train.sft` starts on it the first time and once the cache holds it.

    python tools/bench_data.py                        # 1,000,000 records, 1 and 2 encoding processes
    python tools/bench_data.py --records 100000 --num-proc 1 --work /tmp/bd

It writes a seeded synthetic alpaca-shaped JSONL (Chinese and English instructions, some with an input, answers of
varied length) to --work, then runs the real command, each time in a fresh process:
- first start, once per --num-proc value, each with an empty cache: the encoding figures are the ones the run
  prints (records/s, tokens/s);
- second start, on the cache the first run built: nothing is encoded, the entry is memory-mapped.
Each run is `--max-steps 1 --batch-size 1` on --model (default: the packaged Gemma 3 270M), so it ends after one
step. "start-up" is the time from launching the process to the line that the run prints when its data is ready
(the mixture or the packing line, else the data line); "wall" is the whole run, one step and the saving included.
"peak RSS" is the largest resident set of the run's main process (its encoding workers are separate processes).
A second, smaller set (--small, default a tenth) is started the same way to show that memory does not grow with
the data beyond its index (offsets, rows, lengths and the epoch plan: about 40 bytes a record).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_ZH_TASKS = [
    "请把下面的句子翻译成英文。",
    "用一句话总结下面这段话的意思。",
    "计算{a}加{b}等于多少？",
    "小明有{a}个苹果，又买了{b}个，现在一共有多少个？",
    "请为一家卖{thing}的小店写一句广告语。",
    "解释一下什么是{topic}。",
    "列出三个关于{topic}的常见问题。",
]
_EN_TASKS = [
    "Translate the following sentence into Chinese.",
    "Summarise the paragraph below in one sentence.",
    "What is {a} plus {b}?",
    "Write a short slogan for a shop that sells {thing}.",
    "Explain {topic} to a ten-year-old.",
    "Give three tips for learning {topic}.",
]
_ZH_WORDS = "今天 天气 很好 我们 一起 去 公园 散步 学习 工作 时间 问题 方法 重要 因为 所以 但是 可以 需要 发展".split()
_EN_WORDS = (
    "the a of to and in model data train learn quickly small large city river market price history science "
    "music friend window garden morning evening simple careful"
).split()
_THINGS = ["茶叶", "books", "咖啡", "bicycles", "面包", "flowers", "shoes", "手机壳"]
_TOPICS = ["机器学习", "photosynthesis", "量子力学", "compound interest", "区块链", "the water cycle", "唐诗"]


def _sentence(rng: random.Random, zh: bool, lo: int, hi: int) -> str:
    words = rng.choices(_ZH_WORDS if zh else _EN_WORDS, k=rng.randint(lo, hi))
    return ("".join(words) + "。") if zh else (" ".join(words).capitalize() + ".")


def record(rng: random.Random) -> dict:
    """One alpaca record: an instruction (a template filled in), an input a third of the time, an answer."""
    zh = rng.random() < 0.6
    task = rng.choice(_ZH_TASKS if zh else _EN_TASKS).format(
        a=rng.randint(1, 999), b=rng.randint(1, 999), thing=rng.choice(_THINGS), topic=rng.choice(_TOPICS)
    )
    out = {"instruction": task, "input": "", "output": ""}
    if rng.random() < 1 / 3:
        out["input"] = _sentence(rng, zh, 5, 30)
    out["output"] = " ".join(_sentence(rng, zh, 4, 20) for _ in range(rng.randint(1, 6)))
    return out


def generate(path: Path, n: int, seed: int = 0) -> Path:
    """`n` seeded records as JSONL at `path` (kept when it already holds them)."""
    if path.is_file() and sum(1 for _ in path.open("rb")) == n:
        return path
    rng = random.Random(seed)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for _ in range(n):
            f.write(json.dumps(record(rng), ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path


_ENCODED = re.compile(
    r"encoded .*?: (\d+) records in ([\d.]+) s with (\d+) process.*?\(([\d,]+) records/s, ([\d,]+) tokens/s\)"
)
_READY = re.compile(r"^(packed into|mixture of|train data )")


def run_sft(model: str, data: Path, cache: Path, num_proc: int, out: Path) -> dict:
    """One `python -m train.sft` run: its start-up and wall seconds, peak RSS, the encoding figures it printed."""
    shutil.rmtree(out, ignore_errors=True)  # this tool's own run folder from an earlier measurement
    cmd = [sys.executable, "-m", "train.sft", "--model", model, "--data", str(data), "--data-cache", str(cache)]
    cmd += ["--num-proc", str(num_proc), "--max-steps", "1", "--batch-size", "1", "--out", str(out)]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ready, lines = None, []
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if _READY.match(line):
            ready = time.perf_counter() - start  # the last such line: packing follows the data line
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"error: {' '.join(cmd)} failed:\n" + "\n".join(lines[-15:]))
    result = {"startup_s": ready, "wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}
    for line in lines:
        if m := _ENCODED.search(line):
            records, seconds, used, rate, tokens = m.groups()
            result.update(
                encoded=int(records),
                encode_s=float(seconds),
                processes=int(used),
                records_per_s=int(rate.replace(",", "")),
                tokens_per_s=int(tokens.replace(",", "")),
            )
    return result


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="records in the large set (default 1,000,000)")
    p.add_argument("--small", type=int, default=None, help="records in the small set (default a tenth; 0: none)")
    p.add_argument("--num-proc", default="1,2", help="encoding processes to measure, comma-separated (default 1,2)")
    p.add_argument("--model", default="3-270m", help="model source (default the packaged Gemma 3 270M)")
    p.add_argument("--work", default=str(ROOT / "runs" / "bench-data"), help="folder for the data, caches and runs")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    args = p.parse_args(argv)
    try:
        args.num_proc = [int(n) for n in args.num_proc.split(",")]
    except ValueError:
        p.error(f"--num-proc: expected numbers separated by commas, got {args.num_proc!r}")
    if args.records < 1 or not args.num_proc or min(args.num_proc) < 1:
        p.error("--records and each --num-proc must be at least 1")
    args.small = args.records // 10 if args.small is None else args.small
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    sizes = [args.records] + ([args.small] if args.small else [])
    for n in sizes:
        t = time.perf_counter()
        data = generate(work / f"instructions-{n}.jsonl", n)
        size_mb = data.stat().st_size / 2**20
        print(f"{data}: {n:,} records, {size_mb:,.0f} MiB (ready in {time.perf_counter() - t:.0f} s)", flush=True)
        procs = args.num_proc if n == args.records else args.num_proc[:1]
        for p in procs:
            cache = work / f"cache-{n}-{p}"
            shutil.rmtree(cache, ignore_errors=True)
            first = run_sft(args.model, data, cache, p, work / f"run-{n}-{p}-first")
            rows.append({"records": n, "start": "first", "num_proc": p, **first})
            print(json.dumps(rows[-1]), flush=True)
        second = run_sft(args.model, data, work / f"cache-{n}-{procs[0]}", procs[0], work / f"run-{n}-second")
        rows.append({"records": n, "start": "second", "num_proc": procs[0], **second})
        print(json.dumps(rows[-1]), flush=True)
    print()
    print(
        f"{'records':>10} {'start':>6} {'proc':>4} {'records/s':>10} {'tokens/s':>10} {'start-up':>9} {'wall':>7} "
        f"{'peak RSS':>9}"
    )
    for r in rows:
        rate = f"{r['records_per_s']:,}" if "records_per_s" in r else "-"
        tokens = f"{r['tokens_per_s']:,}" if "tokens_per_s" in r else "-"
        print(
            f"{r['records']:>10,} {r['start']:>6} {r['num_proc']:>4} {rate:>10} {tokens:>10} "
            f"{r['startup_s']:>8.1f}s {r['wall_s']:>6.1f}s {r['peak_rss_mb']:>6.0f} MB"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
