"""The server's per-request metrics, observed from outputs with known times (vLLM's names and
bucket scheme)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from pagedserve.engine.llm_engine import EngineStats
from pagedserve.metrics import ServerMetrics, token_buckets
from pagedserve.outputs import CompletionOutput, RequestOutput


def output(token_ids: list[int], finished: bool, **times: float) -> RequestOutput:
    completion = CompletionOutput(0, "", token_ids, None, None, "length" if finished else None)
    return RequestOutput("r", None, [1] * 7, [completion], finished, metrics=times)


def samples(metrics: ServerMetrics) -> dict[str, float]:
    families = text_string_to_metric_families(metrics.render().decode())
    return {
        s.name + ("" if "le" not in s.labels else f"[{s.labels['le']}]"): s.value
        for family in families
        for s in family.samples
    }


def test_token_buckets():
    assert token_buckets(8192) == (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000)
    assert token_buckets(1) == (1,)


def test_a_finished_request_is_timed_by_phase():
    idle = EngineStats(0, 0, 0.0, 8, 8, 0, 0, 0, 0, 0)
    metrics = ServerMetrics("m", lambda: idle, max_model_len=100)
    times = {"arrival_time": 10.0, "first_scheduled_time": 10.5, "first_token_time": 11.5}
    metrics.on_outputs([output([5], False, **times)], now=11.5)
    metrics.on_outputs([output([5, 6, 7], True, **times, finished_time=14.0)], now=14.0)
    got = samples(metrics)
    expected = {
        "e2e_request_latency_seconds_sum": 4.0,
        "request_queue_time_seconds_sum": 0.5,
        "request_inference_time_seconds_sum": 3.5,
        "request_prefill_time_seconds_sum": 1.0,
        "request_decode_time_seconds_sum": 2.5,
        "request_prompt_tokens_sum": 7,
        "request_generation_tokens_sum": 3,
        "request_generation_tokens_bucket[2.0]": 0,
        "request_generation_tokens_bucket[5.0]": 1,
        "request_prompt_tokens_bucket[100.0]": 1,
        "request_time_per_output_token_seconds_sum": 1.25,  # 2.5 s over the 2 after the first
        "request_params_n_sum": 1,
    }
    for name, value in expected.items():
        assert got["pagedserve:" + name] == value, name


def test_prompt_tokens_count_cached_ones_too_and_the_prefix_is_settable():
    """vLLM's prompt_tokens_total counts every prompt token, computed or found in the prefix
    cache (prompt_tokens_cached_total the latter); ``prefix="vllm:"`` gives vLLM's names."""
    stats = EngineStats(0, 0, 0.0, 8, 8, 0, prefix_cache_queries=30, prefix_cache_hits=16,
                        prompt_tokens=14, generation_tokens=5)  # fmt: skip
    got = samples(ServerMetrics("m", lambda: stats, max_model_len=100, prefix="vllm:"))
    assert got["vllm:prompt_tokens_total"] == 30
    assert got["vllm:prompt_tokens_cached_total"] == 16
    assert got["vllm:generation_tokens_total"] == 5
    assert not any(name.startswith("pagedserve:") for name in got)
