"""Print the vLLM-vs-pagedserve table from the results folder of ``compare_vllm.sh``, with
llama.cpp's columns when that run served it too (``LLAMACPP=1``).

Usage: python benchmarks/compare_table.py OUT_DIR
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# (workload label, result tag, metric key, unit, target ratio ours/vLLM, higher is better)
ROWS = [
    ("serve 64 at once, 128/128", "burst", "output_throughput", "tok/s", 1.2, True),
    ("", "burst", "median_ttft_ms", "ms TTFT p50", 0.85, False),
    ("", "burst", "median_tpot_ms", "ms TPOT p50", None, False),
    ("serve 1 at a time, 128/128", "single", "median_ttft_ms", "ms TTFT p50", 1.0, False),
    ("", "single", "median_tpot_ms", "ms TPOT p50", 1.0, False),
    ("", "single", "output_throughput", "tok/s", None, True),
    ("prefill 32 at once, 1024/32", "prefill", "total_token_throughput", "total tok/s", 1.2, True),
    ("", "prefill", "median_ttft_ms", "ms TTFT p50", None, False),
    ("offline 64 x 128/128", "offline", "output_tokens_per_second", "tok/s", 1.2, True),
    ("", "offline", "tokens_per_second", "total tok/s", None, True),
    (
        "embed 256 at once, 128 in",
        "embed-burst",
        "total_token_throughput",
        "input tok/s",
        None,
        True,
    ),
    ("", "embed-burst", "median_e2el_ms", "ms E2EL p50", None, False),
    ("embed 1 at a time, 128 in", "embed-single", "median_e2el_ms", "ms E2EL p50", None, False),
    ("copy code 1 at a time, greedy", "copy", "output_throughput", "tok/s", None, True),
    ("", "copy", "median_tpot_ms", "ms TPOT p50", None, False),
    ("same, ngram speculation", "copy-ngram", "output_throughput", "tok/s", None, True),
    ("", "copy-ngram", "median_tpot_ms", "ms TPOT p50", None, False),
]
# rows shown only when the run measured them
OPTIONAL = ("embed-burst", "embed-single", "copy", "copy-ngram")

_THROUGHPUT_LINE = re.compile(
    r"Throughput: ([\d.]+) requests/s, ([\d.]+) total tokens/s, ([\d.]+) output tokens/s"
)


def load(out: Path, who: str, tag: str) -> dict | None:
    """One run's metrics: the client's JSON, or the offline benchmark's printed line."""
    if tag != "offline":
        path = out / f"{who}-{tag}.json"
        return json.loads(path.read_text()) if path.exists() else None
    text_path = out / f"{who}-offline.txt"
    if not text_path.exists():
        return None
    match = _THROUGHPUT_LINE.search(text_path.read_text())
    if match is None:
        return None
    requests, total, output = (float(g) for g in match.groups())
    return {
        "requests_per_second": requests,
        "tokens_per_second": total,
        "output_tokens_per_second": output,
    }


def _fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _ratio(ours: float | None, theirs: float | None) -> float | None:
    return ours / theirs if theirs and ours is not None else None


def _value(out: Path, who: str, tag: str, key: str) -> float | None:
    run = load(out, who, tag)
    return run.get(key) if run else None


def table(out: Path) -> str:
    with_llamacpp = any(out.glob("llamacpp-*.json"))
    extra = " llama.cpp | ours / llama.cpp |" if with_llamacpp else ""
    lines = [
        "| workload | metric | vLLM tuned | pagedserve | ours / vLLM | target | met |" + extra,
        "| --- | --- | --- | --- | --- | --- | --- |" + " --- | --- |" * with_llamacpp,
    ]
    for label, tag, key, unit, target, higher in ROWS:
        a, b = _value(out, "vllm", tag, key), _value(out, "ours", tag, key)
        if tag in OPTIONAL and a is None and b is None:
            continue
        ratio = _ratio(b, a)
        goal = "-" if target is None else f"{'>=' if higher else '<='} {target:g}"
        met = "-"
        if target is not None and ratio is not None:
            met = "yes" if (ratio >= target if higher else ratio <= target) else "no"
        row = f"| {label} | {unit} | {_fmt(a)} | {_fmt(b)} | {_fmt(ratio, 2)} | {goal} | {met} |"
        if with_llamacpp:
            c = _value(out, "llamacpp", tag, key)
            row += f" {_fmt(c)} | {_fmt(_ratio(b, c), 2)} |"
        lines.append(row)
    failed = [
        f"{who}-{tag}: {r['failed']} failed"
        for who in ("vllm", "ours", "llamacpp")
        for tag in ("burst", "single", "prefill", *OPTIONAL)
        if (r := load(out, who, tag)) and r.get("failed")
    ]
    if failed:
        lines.append(f"\nfailed requests: {', '.join(failed)}")
    loads = out / "load.txt"
    if loads.exists():
        lines.append("\nload average (1, 5, 15 min) as each run started (2 cores):")
        lines += [f"    {line}" for line in loads.read_text().splitlines()]
    return "\n".join(lines)


if __name__ == "__main__":
    print(table(Path(sys.argv[1])))
