"""Prometheus metrics and the periodic stats log line.

Names are vLLM's with the prefix ``pagedserve:`` (``--metrics-prefix vllm:`` gives vLLM's own
names, for its dashboards and autoscalers as they are).
Engine-wide numbers (queue lengths, KV cache usage, token and cache counters) are read from the
engine's latest ``get_stats()`` snapshot at scrape time; per-request latencies are observed from
the outputs as the async engine hands them to the event loop.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagedserve.outputs import EmbeddingRequestOutput, RequestOutput

logger = logging.getLogger("pagedserve.stats")

PREFIX = "pagedserve:"

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0,
                7.5, 10.0, 20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)  # fmt: skip
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
               10.0, 20.0, 40.0, 80.0)  # fmt: skip
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0,
                   60.0, 120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0)  # fmt: skip

_GAUGES = (
    ("num_requests_running", "num_running", "Number of requests in the running batch."),
    ("num_requests_waiting", "num_waiting", "Number of requests waiting to be scheduled."),
    ("kv_cache_usage_perc", "kv_cache_usage", "KV cache usage (1 means every block is used)."),
)
# (name, the stats summed, help)
_COUNTERS: tuple[tuple[str, tuple[str, ...], str], ...] = (
    (
        "prompt_tokens",
        ("prompt_tokens", "prefix_cache_hits"),
        "Prompt tokens, computed or found in the prefix cache (vLLM's count).",
    ),
    ("prompt_tokens_cached", ("prefix_cache_hits",), "Prompt tokens found in the prefix cache."),
    ("generation_tokens", ("generation_tokens",), "Tokens generated."),
    ("num_preemptions", ("num_preemptions",), "Preemptions of running requests."),
    (
        "prefix_cache_queries",
        ("prefix_cache_queries",),
        "Prompt tokens looked up in the prefix cache.",
    ),
    ("prefix_cache_hits", ("prefix_cache_hits",), "Prompt tokens found in the prefix cache."),
    (
        "spec_decode_num_drafts",
        ("spec_decode_num_drafts",),
        "Sequences whose speculative drafts were checked.",
    ),
    ("spec_decode_num_draft_tokens", ("spec_decode_num_draft_tokens",), "Draft tokens checked."),
    (
        "spec_decode_num_accepted_tokens",
        ("spec_decode_num_accepted_tokens",),
        "Draft tokens accepted.",
    ),
)


def _stat(stats: Any, name: str) -> float:
    return float(getattr(stats, name, 0) or 0)


def _sum(stats: Any, names: tuple[str, ...]) -> float:
    return sum(_stat(stats, name) for name in names)


class _EngineStatsCollector(Collector):
    """Exposes the engine's latest stats snapshot as gauges and counters at scrape time."""

    def __init__(self, get_stats: Callable[[], Any], model_name: str, prefix: str) -> None:
        self._get_stats = get_stats
        self._model_name = model_name
        self._prefix = prefix

    def collect(self) -> Iterator[Metric]:
        stats, prefix = self._get_stats(), self._prefix
        for suffix, attr, doc in _GAUGES:
            gauge = GaugeMetricFamily(prefix + suffix, doc, labels=["model_name"])
            gauge.add_metric([self._model_name], _stat(stats, attr))
            yield gauge
        for suffix, attrs, doc in _COUNTERS:
            counter = CounterMetricFamily(prefix + suffix, doc, labels=["model_name"])
            counter.add_metric([self._model_name], _sum(stats, attrs))
            yield counter
        per_pos = getattr(stats, "spec_decode_num_accepted_tokens_per_pos", ())
        if per_pos:
            counter = CounterMetricFamily(
                prefix + "spec_decode_num_accepted_tokens_per_pos",
                "Draft tokens accepted, by their position among the drafts.",
                labels=["model_name", "position"],
            )
            for position, count in enumerate(per_pos):
                counter.add_metric([self._model_name, str(position)], float(count))
            yield counter


def token_buckets(max_model_len: int) -> tuple[int, ...]:
    """1, 2, 5, 10, 20, 50 ... up to the context length (vLLM's buckets of token counts)."""
    buckets: list[int] = []
    exponent = 0
    while True:
        for mantissa in (1, 2, 5):
            value = mantissa * 10**exponent
            if value > max_model_len:
                return tuple(buckets)
            buckets.append(value)
        exponent += 1


class ServerMetrics:
    """The server's Prometheus registry; also the async engine's observer of outputs and aborts."""

    def __init__(
        self,
        model_name: str,
        get_stats: Callable[[], Any],
        max_model_len: int = 8192,
        prefix: str = PREFIX,
    ) -> None:
        disable_created_metrics()  # no *_created series, as vLLM
        self.registry = CollectorRegistry()
        self.registry.register(_EngineStatsCollector(get_stats, model_name, prefix))
        labels = ["model_name"]

        def histogram(suffix: str, doc: str, buckets: tuple[float, ...]) -> Histogram:
            return Histogram(
                prefix + suffix, doc, labels, buckets=buckets, registry=self.registry
            ).labels(model_name)

        self.ttft = histogram(
            "time_to_first_token_seconds", "Time to the first generated token.", TTFT_BUCKETS
        )
        self.itl = histogram(
            "inter_token_latency_seconds", "Time between consecutive output tokens.", ITL_BUCKETS
        )
        self.e2e = histogram(
            "e2e_request_latency_seconds", "Arrival to finish of each request.", REQUEST_BUCKETS
        )
        self.queue = histogram(
            "request_queue_time_seconds", "Time each request waited to be scheduled.",
            REQUEST_BUCKETS,
        )  # fmt: skip
        self.inference = histogram(
            "request_inference_time_seconds", "First scheduled to finish of each request.",
            REQUEST_BUCKETS,
        )  # fmt: skip
        self.prefill = histogram(
            "request_prefill_time_seconds", "First scheduled to first token of each request.",
            REQUEST_BUCKETS,
        )  # fmt: skip
        self.decode = histogram(
            "request_decode_time_seconds", "First token to finish of each request.",
            REQUEST_BUCKETS,
        )  # fmt: skip
        lengths = token_buckets(max_model_len)
        self.prompt_tokens = histogram(
            "request_prompt_tokens", "Prompt tokens of each finished request.", lengths
        )
        self.generation_tokens = histogram(
            "request_generation_tokens", "Tokens generated by each finished request.", lengths
        )
        self.tpot = histogram(
            "request_time_per_output_token_seconds",
            "Decode time over the tokens after the first, of each request.",
            ITL_BUCKETS,
        )
        self.params_n = histogram(
            "request_params_n", "The n (choices) of each finished request.", (1, 2, 5, 10, 20)
        )
        self._success = Counter(
            prefix + "request_success",
            "Requests that finished, by finish reason.",
            ["model_name", "finished_reason"],
            registry=self.registry,
        )
        self._model_name = model_name
        self._live: dict[str, list[float]] = {}  # request id -> [arrival, last token time, tokens]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # ---- EngineObserver ----
    def on_outputs(
        self, outputs: list[RequestOutput] | list[EmbeddingRequestOutput], now: float
    ) -> None:
        live = self._live
        for out in outputs:
            generated = isinstance(out, RequestOutput)  # an embedding has no tokens to time
            state = live.get(out.request_id)
            if state is None:
                state = [out.metrics.get("arrival_time", now), 0.0, 0.0]
                live[out.request_id] = state
            num_tokens = sum(len(c.token_ids) for c in out.outputs) if generated else 0
            if num_tokens > state[2]:
                if state[2] == 0:
                    first = out.metrics.get("first_token_time", now)
                    self.ttft.observe(max(0.0, first - state[0]))
                else:
                    self.itl.observe(max(0.0, now - state[1]))
                state[1] = now
                state[2] = num_tokens
            if out.finished:
                del live[out.request_id]
                self._finished(out, state[0], num_tokens, now)
                reason = out.outputs[0].finish_reason if generated and out.outputs else None
                self._success.labels(self._model_name, reason or "stop").inc()

    def _finished(
        self, out: RequestOutput | EmbeddingRequestOutput, arrival: float, tokens: int, now: float
    ) -> None:
        times = out.metrics
        finished = times.get("finished_time", now)
        self.e2e.observe(max(0.0, finished - arrival))
        self.prompt_tokens.observe(len(out.prompt_token_ids))
        self.generation_tokens.observe(tokens)
        scheduled = times.get("first_scheduled_time")
        if scheduled is None:
            return
        self.queue.observe(max(0.0, scheduled - arrival))
        self.inference.observe(max(0.0, finished - scheduled))
        first = times.get("first_token_time", finished)
        self.prefill.observe(max(0.0, first - scheduled))
        self.decode.observe(max(0.0, finished - first))
        if isinstance(out, RequestOutput):
            self.params_n.observe(len(out.outputs))
            per_choice = tokens / max(1, len(out.outputs))
            if per_choice > 1:
                self.tpot.observe(max(0.0, finished - first) / (per_choice - 1))

    def on_abort(self, request_id: str) -> None:
        self._live.pop(request_id, None)
        self._success.labels(self._model_name, "abort").inc()


class StatsLogger:
    """Logs one line of throughput and cache numbers per interval while there is traffic."""

    def __init__(self, get_stats: Callable[[], Any]) -> None:
        self._get_stats = get_stats
        self._last = get_stats()
        self._last_time = time.monotonic()
        self._was_busy = False

    def log(self) -> None:
        stats = self._get_stats()
        now = time.monotonic()
        elapsed = max(now - self._last_time, 1e-6)
        prev = self._last
        prompt = _stat(stats, "prompt_tokens") - _stat(prev, "prompt_tokens")
        generated = _stat(stats, "generation_tokens") - _stat(prev, "generation_tokens")
        queries = _stat(stats, "prefix_cache_queries") - _stat(prev, "prefix_cache_queries")
        hits = _stat(stats, "prefix_cache_hits") - _stat(prev, "prefix_cache_hits")
        drafted = _stat(stats, "spec_decode_num_draft_tokens") - _stat(
            prev, "spec_decode_num_draft_tokens"
        )
        accepted = _stat(stats, "spec_decode_num_accepted_tokens") - _stat(
            prev, "spec_decode_num_accepted_tokens"
        )
        checks = _stat(stats, "spec_decode_num_drafts") - _stat(prev, "spec_decode_num_drafts")
        running = int(_stat(stats, "num_running"))
        waiting = int(_stat(stats, "num_waiting"))
        busy = bool(prompt or generated or running or waiting)
        self._last, self._last_time = stats, now
        if not busy and not self._was_busy:
            return
        self._was_busy = busy
        logger.info(
            "Avg prompt throughput: %.1f tokens/s, Avg generation throughput: %.1f tokens/s, "
            "Running: %d reqs, Waiting: %d reqs, KV cache usage: %.1f%%, "
            "Prefix cache hit rate: %.1f%%",
            prompt / elapsed,
            generated / elapsed,
            running,
            waiting,
            100.0 * _stat(stats, "kv_cache_usage"),
            100.0 * hits / queries if queries else 0.0,
        )
        if drafted:
            per_pos = [
                (now - then) / checks
                for now, then in zip(
                    stats.spec_decode_num_accepted_tokens_per_pos,
                    prev.spec_decode_num_accepted_tokens_per_pos,
                    strict=True,
                )
            ]
            logger.info(
                "SpecDecoding metrics: Mean acceptance length: %.2f, Draft acceptance rate: "
                "%.1f%%, Accepted: %d tokens, Drafted: %d tokens, Per-position acceptance "
                "rate: %s",
                1.0 + accepted / checks,
                100.0 * accepted / drafted,
                accepted,
                drafted,
                ", ".join(f"{rate:.3f}" for rate in per_pos),
            )
