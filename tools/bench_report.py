"""tools/bench.py's report: each row's label and target, the table it prints, and the README's Performance table
it writes (between `<!-- bench:begin -->` and `<!-- bench:end -->`), all from the run's JSON."""

from __future__ import annotations

from pathlib import Path

from gemma.errors import GemmaError
from gemma.writing import write_atomically

LABELS = {
    "decode1": "greedy decode, batch 1",
    "decode8": "greedy decode, batch 8",
    "prefill": "prefill",
    "sft": "LoRA SFT step",
    "serve8": "serving engine, 8 requests at once",
}
AGAINST = {"serve8": "1 request", "llama.cpp": "llama.cpp Q4_0"}
# What the project aims for (issue 20), by row: speed ratios, peak-memory ratios, shares of the bandwidth bound.
TARGETS = {
    "compiled-decode1": 2.0,
    "decode8": 1.5,
    "compiled-decode8": 1.5,
    "serve8": 7.0,
    "compiled-serve8": 7.0,
    "prefill": 1.3,
    "compiled-prefill": 1.3,
    "sft": 2.5,
    "int8-decode1": 2.5,
    "int8-compiled-decode1": 2.5,
    "int4-decode1-llama.cpp": 0.8,
    "int4-compiled-decode1-llama.cpp": 0.8,
}
MEMORY_TARGETS = {"sft": 0.35}
BOUND_TARGETS = {"compiled-decode1": 0.75}
BEGIN, END = "<!-- bench:begin -->", "<!-- bench:end -->"


def _parts(key: str) -> tuple[str | None, bool, str, str | None]:
    """(quantize, compiled, kind, reference) of a row key such as 'int4-compiled-decode1-llama.cpp'."""
    parts = key.split("-")
    kind = next(p for p in parts if p in LABELS)
    i = parts.index(kind)
    before, after = parts[:i], parts[i + 1 :]
    quantize = next((p for p in before if p != "compiled"), None)
    return quantize, "compiled" in before, kind, "-".join(after) or None


def label(key: str) -> str:
    """'int8 decode, batch 1, --compile' for the key 'int8-compiled-decode1'."""
    quantize, compiled, kind, _ = _parts(key)
    text = LABELS[kind]
    if quantize:
        text = f"{quantize} {text.removeprefix('greedy ')}"
    return text + (", --compile" if compiled else "")


def against(key: str) -> str:
    """What the row's reference side is."""
    _, _, kind, reference = _parts(key)
    return AGAINST.get(reference or kind, "transformers" + (" + peft" if kind == "sft" else ""))


def plain_key(key: str) -> str | None:
    """The row a variant row's gain is measured against: the same workload and reference without the variant's
    last change (compiled against eager, int8 / int4 against bf16)."""
    quantize, compiled, kind, reference = _parts(key)
    if reference == "llama.cpp":
        return None
    if compiled:
        return "-".join(p for p in (quantize, kind) if p)
    return kind if quantize else None


def gb(nbytes: float) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def _mark(value: float, target: float | None, higher: bool = True) -> str:
    if target is None:
        return ""
    return " ok" if (value >= target if higher else value <= target) else " MISSED"


def rows(result: dict) -> list[tuple[str, ...]]:
    """The table: a header and one tuple of cells per row."""
    head = (
        "workload",
        "ours",
        "against",
        "theirs",
        "speed",
        "target",
        "gain",
        "ours peak",
        "their peak",
        "memory",
        "ours/bound",
        "theirs/bound",
    )
    out = [head]
    results = result["results"]
    for key, r in results.items():
        o, ref, speed = r["ours"], r["reference"], r["speed"]
        target = TARGETS.get(key)
        plain = plain_key(key)
        gain = f"{speed / results[plain]['speed']:.2f}x" if plain in results else ""
        if "peak_memory" in o:
            mem = o["peak_memory"] / ref["peak_memory"]
            memory = (
                gb(o["peak_memory"]),
                gb(ref["peak_memory"]),
                f"{mem:.2f}x" + _mark(mem, MEMORY_TARGETS.get(key), False),
            )
        else:
            memory = ("", "", "")
        bounds = []
        for side, bound_target in ((o, BOUND_TARGETS.get(key)), (ref, None)):
            share = side["median"] / side["bound_tokens_per_s"] if "bound_tokens_per_s" in side else None
            bounds.append("" if share is None else f"{share:.0%}" + _mark(share, bound_target))
        out.append(
            (
                r["label"],
                f"{o['median']:.1f} tok/s",
                r["against"],
                f"{ref['median']:.1f} tok/s",
                f"{speed:.2f}x",
                f">={target}x{_mark(speed, target)}" if target else "",
                gain,
                *memory,
                *bounds,
            )
        )
    return out


def _plain(cells: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _markdown(cells: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "---|" * len(cells[0]))
    return "\n".join(lines)


def notes(result: dict) -> list[str]:
    """The lines under the table: compile times, the bandwidth, greedy agreement of each quantized mode."""
    lines = []
    results = result["results"]
    firsts = [  # a llama.cpp row's ours is a transformers row's ours again
        (r["label"], r["ours"]["first_s"])
        for k, r in results.items()
        if "compiled" in k and "first_s" in r["ours"] and not k.endswith("llama.cpp")
    ]
    if firsts:
        lines.append(
            "--compile: the first run of each process (compiling) took "
            + ", ".join(f"{name} {first:.1f} s" for name, first in firsts)
            + "; later runs are the figures above."
        )
    if "bandwidth" in result:
        probes = result.get("bandwidth_probes") or [result["bandwidth"]]
        lo, hi = min(probes) / 1e9, max(probes) / 1e9
        lines.append(
            f"Bandwidth bound: weight bytes read per step against {result['bandwidth'] / 1e9:.1f} GB/s, the best "
            f"read rate of the run's {len(probes)} processes (they ranged {lo:.1f}-{hi:.1f} GB/s)."
        )
    dtype = result["settings"]["dtype"]
    for mode, a in (result.get("agreement") or {}).items():
        lines.append(
            f"{mode} greedy agreement with {dtype} over {a['prompts']} prompts x {a['tokens'] // a['prompts']} "
            f"tokens: the same choice at {a['teacher_forced']:.1%} of positions given the same context (fp32 vs "
            f"{dtype}: {a['teacher_forced_fp32']:.1%}); free-running, {a['identical_prefix']:.1%} of tokens before "
            f"the first difference, {a['identical_replies']:.0%} of replies identical."
        )
    return lines


def header(result: dict) -> str:
    m, st = result["machine"], result["settings"]
    versions = ", ".join(f"{name} {m[name]}" for name in ("torch", "transformers", "peft", "llama_cpp") if m.get(name))
    flags = ", ".join(m.get("cpu_flags", [])) or "no flags read"
    return (
        f"{result['source']} on {st['device']} ({st['dtype']}), {result['date'][:10]}: {m['cpu']} ({flags}), "
        f"{m['threads']} threads; {versions}. {st['reps']} processes per row, both sides taking turns in each."
    )


def text(result: dict) -> str:
    return "\n".join([header(result), _plain(rows(result)), *notes(result)])


def markdown(result: dict) -> str:
    """The README's block: the header, the table, the notes (written by `write_readme`)."""
    return "\n".join([header(result), "", _markdown(rows(result)), "", *(f"- {line}" for line in notes(result))])


def check_readme(path: Path) -> str:
    """FILE's text, once it is known to hold the two marker lines (before a long run, not after)."""
    try:
        body = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise GemmaError(f"{path}: cannot read it ({exc})") from None
    if body.count(BEGIN) != 1 or body.count(END) != 1 or body.index(BEGIN) > body.index(END):
        raise GemmaError(f"{path}: needs one {BEGIN} line and, after it, one {END} line, around the table to write")
    return body


def write_readme(path: Path, result: dict) -> None:
    body = check_readme(path)
    start, end = body.index(BEGIN) + len(BEGIN), body.index(END)
    write_atomically(path, body[:start] + "\n" + markdown(result) + "\n" + body[end:])
