"""Print the vLLM-vs-pagedserve table from the results folder of ``compare_vllm.sh``.

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
]

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


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def table(out: Path) -> str:
    lines = [
        "| workload | metric | vLLM tuned | pagedserve | ours / vLLM | target | met |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, tag, key, unit, target, higher in ROWS:
        theirs, ours = load(out, "vllm", tag), load(out, "ours", tag)
        a = theirs.get(key) if theirs else None
        b = ours.get(key) if ours else None
        ratio = b / a if a and b is not None else None
        goal = "-" if target is None else f"{'>=' if higher else '<='} {target:g}"
        met = "-"
        if target is not None and ratio is not None:
            met = "yes" if (ratio >= target if higher else ratio <= target) else "no"
        ratio_text = "-" if ratio is None else f"{ratio:.2f}"
        lines.append(
            f"| {label} | {unit} | {_fmt(a)} | {_fmt(b)} | {ratio_text} | {goal} | {met} |"
        )
    failed = [
        f"{who}-{tag}: {r['failed']} failed"
        for who in ("vllm", "ours")
        for tag in ("burst", "single", "prefill")
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
