"""Per-request timings of a serving benchmark, their summary, and the report vLLM's prints."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

# metric name -> (section title, label in the report)
_LATENCY_METRICS = {
    "ttft": ("Time to First Token", "TTFT"),
    "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
    "itl": ("Inter-token Latency", "ITL"),
    "e2el": ("End-to-end Latency", "E2EL"),
}
_WIDTH = 50


@dataclass
class RequestResult:
    """What the client saw of one request; times in seconds."""

    prompt_len: int
    success: bool = False
    output_tokens: int = 0
    ttft: float = 0.0  # send to first chunk with text
    itl: list[float] = field(default_factory=list)  # gaps between later chunks with text
    latency: float = 0.0  # send to end of stream
    generated_text: str = ""
    error: str = ""


def _summary(name: str, values_s: list[float], percentiles: list[float]) -> dict[str, float]:
    ms = np.asarray(values_s or [0.0], dtype=np.float64) * 1000.0
    out = {
        f"mean_{name}_ms": float(ms.mean()),
        f"median_{name}_ms": float(np.median(ms)),
        f"std_{name}_ms": float(ms.std()),
    }
    for p in percentiles:
        out[f"p{p:g}_{name}_ms"] = float(np.percentile(ms, p))
    return out


def compute_metrics(
    results: list[RequestResult], duration: float, percentiles: list[float]
) -> dict:
    """Throughputs over ``duration`` and latency statistics over the successful requests."""
    ok = [r for r in results if r.success]
    input_tokens = sum(r.prompt_len for r in ok)
    output_tokens = sum(r.output_tokens for r in ok)
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    metrics: dict = {
        "duration": duration,
        "completed": len(ok),
        "failed": len(results) - len(ok),
        "total_input_tokens": input_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(ok) / duration,
        "output_throughput": output_tokens / duration,
        "total_token_throughput": (input_tokens + output_tokens) / duration,
    }
    metrics |= _summary("ttft", [r.ttft for r in ok], percentiles)
    metrics |= _summary("tpot", tpots, percentiles)
    metrics |= _summary("itl", [gap for r in ok for gap in r.itl], percentiles)
    metrics |= _summary("e2el", [r.latency for r in ok], percentiles)
    return metrics


def per_request_details(results: list[RequestResult]) -> dict:
    """The raw per-request lists that ``--save-result`` keeps next to the summary."""
    return {
        "input_lens": [r.prompt_len for r in results],
        "output_lens": [r.output_tokens for r in results],
        "ttfts": [r.ttft for r in results],
        "itls": [r.itl for r in results],
        "generated_texts": [r.generated_text for r in results],
        "errors": [r.error for r in results],
    }


def _line(label: str, value: object) -> str:
    text = f"{value:.2f}" if isinstance(value, float) else str(value)
    return f"{label:<40}{text:<10}"


def format_report(
    metrics: dict,
    percentiles: list[float],
    request_rate: float,
    max_concurrency: int | None,
    only_e2el: bool = False,
) -> str:
    """vLLM's report; ``only_e2el`` for an embeddings run, whose requests have only an
    end-to-end latency."""
    lines = [
        " Serving Benchmark Result ".center(_WIDTH, "="),
        _line("Successful requests:", metrics["completed"]),
        _line("Failed requests:", metrics["failed"]),
    ]
    if max_concurrency is not None:
        lines.append(_line("Maximum request concurrency:", max_concurrency))
    lines += [
        _line("Request rate configured (RPS):", request_rate),
        _line("Benchmark duration (s):", metrics["duration"]),
        _line("Total input tokens:", metrics["total_input_tokens"]),
        _line("Total generated tokens:", metrics["total_output_tokens"]),
        _line("Request throughput (req/s):", metrics["request_throughput"]),
        _line("Output token throughput (tok/s):", metrics["output_throughput"]),
        _line("Total token throughput (tok/s):", metrics["total_token_throughput"]),
    ]
    for name, (title, label) in _LATENCY_METRICS.items():
        if only_e2el and name != "e2el":
            continue
        lines.append(f" {title} ".center(_WIDTH, "-"))
        lines.append(_line(f"Mean {label} (ms):", metrics[f"mean_{name}_ms"]))
        lines.append(_line(f"Median {label} (ms):", metrics[f"median_{name}_ms"]))
        for p in percentiles:
            lines.append(_line(f"P{p:g} {label} (ms):", metrics[f"p{p:g}_{name}_ms"]))
    lines.append("=" * _WIDTH)
    return "\n".join(lines)
