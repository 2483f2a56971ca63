"""The server under concurrent traffic and abandoned requests: every stream correct, and every
request a client drops is aborted at once (nothing running, every KV block free)."""

from __future__ import annotations

import asyncio
import http.client
import json
import time

import pytest
from server_utils import (
    MODEL_NAME,
    ServerProcess,
    metrics,
    open_stream,
    request,
    wait_until_idle,
)

PROMPTS = [
    "The capital of France is",
    "Once upon a time",
    "The three primary colours are",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def server():
    srv = ServerProcess(
        ["--served-model-name", MODEL_NAME, "--max-model-len", "1024", "--kv-cache-memory", "0.5"]
    ).wait_ready()
    yield srv
    srv.close()


def test_64_concurrent_streams_are_all_correct(server):
    client = server.client()
    expected = {
        p: client.completions.create(model=MODEL_NAME, prompt=p, max_tokens=12, temperature=0)
        .choices[0]
        .text
        for p in PROMPTS
    }

    async def one(aclient, prompt: str, use_chat: bool) -> tuple[str, str, int]:
        text, usage = "", None
        if use_chat:
            stream = await aclient.chat.completions.create(
                model=MODEL_NAME,
                messages=[{"role": "user", "content": prompt}],
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
        else:
            stream = await aclient.completions.create(
                model=MODEL_NAME,
                prompt=prompt,
                max_tokens=12,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].text
                usage = chunk.usage or usage
        return prompt, text, usage.completion_tokens

    async def main():
        async with server.async_client(timeout=300) as aclient:
            jobs = [one(aclient, PROMPTS[i % 4], use_chat=i % 8 == 7) for i in range(64)]
            return await asyncio.gather(*jobs)

    chat_expected = {
        p: client.chat.completions.create(
            model=MODEL_NAME,
            messages=[{"role": "user", "content": p}],
            max_tokens=12,
            temperature=0,
        )
        .choices[0]
        .message.content
        for p in PROMPTS[3:]
    }
    results = asyncio.run(main())
    assert len(results) == 64
    for i, (prompt, text, completion_tokens) in enumerate(results):
        want = chat_expected[prompt] if i % 8 == 7 else expected[prompt]
        assert text == want, (i, prompt)
        assert completion_tokens <= 12
    m = wait_until_idle(server.url)
    assert m["pagedserve:num_requests_running"] == 0 and m["pagedserve:kv_cache_usage_perc"] == 0


def _aborts(url: str) -> float:
    return sum(v for k, v in metrics(url).items() if 'finished_reason="abort"' in k)


def test_client_disconnect_mid_stream_frees_everything(server):
    aborted_before = _aborts(server.url)
    generated_before = metrics(server.url)["pagedserve:generation_tokens_total"]
    body = {
        "model": MODEL_NAME,
        "prompt": "Write a long story about a dragon.",
        "max_tokens": 900,
        "ignore_eos": True,
        "stream": True,
    }
    conns = []
    for _ in range(3):
        conn, resp = open_stream(server.url, "/v1/completions", body)
        lines = [resp.readline() for _ in range(6)]  # a few chunks: generation is under way
        assert any(line.startswith(b"data: {") for line in lines)
        conns.append(conn)
    assert metrics(server.url)["pagedserve:num_requests_running"] >= 1
    for conn in conns:
        conn.sock.close()
        conn.close()
    m = wait_until_idle(server.url)
    assert m["pagedserve:num_requests_running"] == 0
    assert m["pagedserve:num_requests_waiting"] == 0
    assert m["pagedserve:kv_cache_usage_perc"] == 0
    assert _aborts(server.url) - aborted_before == 3
    assert m["pagedserve:generation_tokens_total"] - generated_before < 3 * 900


def test_client_disconnect_while_waiting_for_a_full_response(server):
    aborted_before = _aborts(server.url)
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    body = {"model": MODEL_NAME, "prompt": "Tell me", "max_tokens": 900, "ignore_eos": True}
    conn.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    deadline = time.monotonic() + 60
    while metrics(server.url)["pagedserve:num_requests_running"] == 0:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    conn.sock.close()
    conn.close()
    m = wait_until_idle(server.url)
    assert m["pagedserve:num_requests_running"] == 0
    assert m["pagedserve:kv_cache_usage_perc"] == 0
    assert _aborts(server.url) - aborted_before == 1


def test_metrics_names(server):
    m = metrics(server.url)
    for name in (
        "num_requests_running",
        "num_requests_waiting",
        "kv_cache_usage_perc",
        "prompt_tokens_total",
        "generation_tokens_total",
        "request_success_total",
        "num_preemptions_total",
        "prefix_cache_queries_total",
        "prefix_cache_hits_total",
        "time_to_first_token_seconds_count",
        "inter_token_latency_seconds_count",
        "e2e_request_latency_seconds_count",
        "request_queue_time_seconds_count",
        "request_inference_time_seconds_count",
        "request_prefill_time_seconds_count",
        "request_decode_time_seconds_count",
        "request_prompt_tokens_count",
        "request_generation_tokens_count",
    ):
        assert "pagedserve:" + name in m, name
    assert m["pagedserve:generation_tokens_total"] > 0
    assert m["pagedserve:time_to_first_token_seconds_count"] > 0
    assert m["pagedserve:prefix_cache_queries_total"] >= m["pagedserve:prefix_cache_hits_total"]
    # the stats line is logged at the first interval's end (2 s here) after traffic; the tests
    # before this one may all finish inside one interval
    deadline = time.monotonic() + 10
    while "Avg generation throughput" not in server.output() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "Avg generation throughput" in server.output()


def test_huge_prompt_is_refused_while_a_stream_runs(server):
    client = server.client()
    expected = (
        client.completions.create(model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0)
        .choices[0]
        .text
    )
    stream = client.completions.create(
        model=MODEL_NAME, prompt=PROMPTS[1], max_tokens=16, temperature=0, stream=True
    )
    first = next(iter(stream)).choices[0].text
    huge = "The quick brown fox jumps over the lazy dog. " * 60_000  # 2.7 MB, ~600k tokens
    status, body = request(
        server.url + "/v1/completions", "POST", {"model": MODEL_NAME, "prompt": huge}
    )
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    rest = "".join(chunk.choices[0].text for chunk in stream)
    assert first + rest == expected
