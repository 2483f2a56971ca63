"""``pagedserve bench serve``: a load generator for any OpenAI-compatible server (ours, vLLM,
llama.cpp) that streams every request and reports throughput and TTFT / TPOT / ITL / E2EL, as
``vllm bench serve`` does. ``--endpoint embeddings`` sends each prompt to ``/v1/embeddings``
instead (one input a request, not streamed) and reports input throughput and E2EL.

Requests arrive as a Poisson process at ``--request-rate`` (``inf``: all at once), optionally
capped at ``--max-concurrency`` in flight. Output tokens are counted from the usage chunk that
``stream_options.include_usage`` asks for, or by tokenizing the text when a server sends none.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import aiohttp
import numpy as np
from tqdm import tqdm

from pagedserve.bench.datasets import (
    SampleRequest,
    dataset_requests,
    load_tokenizer,
    random_text_requests,
)
from pagedserve.bench.serve_metrics import (
    RequestResult,
    compute_metrics,
    format_report,
    per_request_details,
)
from pagedserve.bench.workload_args import add_workload_args

_ENDPOINTS = {
    "completions": "/v1/completions",
    "chat": "/v1/chat/completions",
    "embeddings": "/v1/embeddings",
}
_TIMEOUT = aiohttp.ClientTimeout(total=6 * 3600)


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="server to measure")
    parser.add_argument("--model", default=None, help="model name (default: the server's first)")
    parser.add_argument(
        "--endpoint",
        default="completions",
        help="completions, chat or embeddings (or a path such as /v1/chat/completions)",
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer to make and count prompts with (default: the packaged model's)",
    )
    add_workload_args(parser)
    parser.add_argument(
        "--request-rate",
        type=float,
        default=math.inf,
        help="requests per second, Poisson arrivals; inf sends them all at once",
    )
    parser.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma shape of arrival gaps (1: Poisson)"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="most in flight")
    parser.add_argument("--ignore-eos", action="store_true", help="send ignore_eos: true")
    parser.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="sent when given (0 is greedy); by default the server's default applies",
    )
    parser.add_argument("--seed", type=int, default=0, help="workload and arrival seed")
    parser.add_argument(
        "--metric-percentiles", default="99", help="comma-separated percentiles to report"
    )
    parser.add_argument(
        "--skip-test-request", action="store_true", help="no short check request before the run"
    )
    parser.add_argument("--save-result", default=None, help="write results as JSON to this path")
    parser.add_argument("--disable-tqdm", action="store_true", help="no progress bar")


@dataclass
class Target:
    """Where and how requests are sent."""

    url: str
    model: str
    chat: bool
    ignore_eos: bool
    temperature: float | None

    @property
    def embeddings(self) -> bool:
        return self.url.endswith("/embeddings")


def _endpoint_path(endpoint: str) -> str:
    return _ENDPOINTS.get(endpoint, endpoint if endpoint.startswith("/") else "/" + endpoint)


def _payload(target: Target, prompt: str, max_tokens: int) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": target.model,
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if target.chat:
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if target.ignore_eos:
        body["ignore_eos"] = True
    if target.temperature is not None:
        body["temperature"] = target.temperature
    return body


def _chunk_text(chunk: dict, chat: bool) -> str:
    choices = chunk.get("choices") or []
    if not choices:
        return ""
    if chat:
        return (choices[0].get("delta") or {}).get("content") or ""
    return choices[0].get("text") or ""


async def _sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[bytes]:
    """The payloads of the ``data:`` lines of a server-sent event stream."""
    buffer = b""
    async for piece in response.content.iter_any():
        buffer += piece
        *lines, buffer = buffer.split(b"\n")
        for line in lines:
            line = line.strip()
            if line.startswith(b"data:"):
                yield line[5:].strip()
    if buffer.strip().startswith(b"data:"):
        yield buffer.strip()[5:].strip()


async def send_request(
    session: aiohttp.ClientSession, target: Target, request: SampleRequest, tokenizer: Any
) -> RequestResult:
    """Stream one request and time its chunks."""
    assert isinstance(request.prompt, str)
    if target.embeddings:
        return await _send_embedding_request(session, target, request)
    result = RequestResult(prompt_len=request.prompt_len)
    payload = _payload(target, request.prompt, request.expected_output_len)
    usage_tokens = None
    pieces: list[str] = []
    start = last = time.perf_counter()
    try:
        async with session.post(target.url, json=payload) as response:
            if response.status != 200:
                result.error = f"HTTP {response.status}: {(await response.text())[:500]}"
                return result
            async for data in _sse_data(response):
                if data == b"[DONE]":
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = json.dumps(chunk["error"])[:500]
                    return result
                now = time.perf_counter()
                text = _chunk_text(chunk, target.chat)
                if text:
                    if not pieces:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    pieces.append(text)
                usage = chunk.get("usage")
                if usage:
                    usage_tokens = usage.get("completion_tokens")
                    result.prompt_len = usage.get("prompt_tokens", result.prompt_len)
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    result.generated_text = "".join(pieces)
    if not pieces:
        result.ttft = result.latency
    if usage_tokens is None:
        usage_tokens = len(tokenizer.encode(result.generated_text, add_special_tokens=False))
    result.output_tokens = int(usage_tokens)
    result.success = True
    return result


async def _send_embedding_request(
    session: aiohttp.ClientSession, target: Target, request: SampleRequest
) -> RequestResult:
    """One prompt's embedding; its latency is the whole request's."""
    result = RequestResult(prompt_len=request.prompt_len)
    payload = {"model": target.model, "input": request.prompt, "encoding_format": "float"}
    start = time.perf_counter()
    try:
        async with session.post(target.url, json=payload) as response:
            body = await response.json(content_type=None)
            if response.status != 200:
                result.error = f"HTTP {response.status}: {json.dumps(body)[:500]}"
                return result
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = result.ttft = time.perf_counter() - start
    result.prompt_len = (body.get("usage") or {}).get("prompt_tokens", result.prompt_len)
    result.success = bool(body.get("data"))
    if not result.success:
        result.error = f"no embedding in {json.dumps(body)[:500]}"
    return result


async def _arrivals(
    requests: list[SampleRequest], rate: float, burstiness: float, seed: int
) -> AsyncIterator[SampleRequest]:
    """Yield the requests at Poisson (gamma, for burstiness != 1) arrival times."""
    rng = np.random.default_rng(seed)
    for request in requests:
        yield request
        if math.isfinite(rate):
            await asyncio.sleep(rng.gamma(burstiness, 1.0 / (rate * burstiness)))


async def first_model_id(session: aiohttp.ClientSession, base_url: str) -> str:
    async with session.get(base_url + "/v1/models") as response:
        response.raise_for_status()
        return (await response.json())["data"][0]["id"]


async def run_benchmark(
    base_url: str,
    requests: list[SampleRequest],
    tokenizer: Any,
    *,
    model: str | None = None,
    endpoint: str = "completions",
    request_rate: float = math.inf,
    burstiness: float = 1.0,
    max_concurrency: int | None = None,
    ignore_eos: bool = False,
    temperature: float | None = None,
    seed: int = 0,
    test_request: bool = True,
    disable_tqdm: bool = False,
) -> tuple[list[RequestResult], float, str]:
    """Send every request; return the results, the benchmark's duration and the model name."""
    base_url = base_url.rstrip("/")
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    connector = aiohttp.TCPConnector(limit=max_concurrency or 0)
    async with aiohttp.ClientSession(timeout=_TIMEOUT, connector=connector) as session:
        model = model or await first_model_id(session, base_url)
        path = _endpoint_path(endpoint)
        target = Target(
            base_url + path, model, path.endswith("chat/completions"), ignore_eos, temperature
        )
        if test_request:
            check = await send_request(session, target, SampleRequest("Hello", 1, 4), tokenizer)
            if not check.success:
                raise RuntimeError(f"the test request to {target.url} failed: {check.error}")
        progress = tqdm(total=len(requests), desc="Requests", disable=disable_tqdm)

        async def one(request: SampleRequest) -> RequestResult:
            if limit is None:
                result = await send_request(session, target, request, tokenizer)
            else:
                async with limit:
                    result = await send_request(session, target, request, tokenizer)
            progress.update(1)
            return result

        start = time.perf_counter()
        tasks = [
            asyncio.create_task(one(r))
            async for r in _arrivals(requests, request_rate, burstiness, seed)
        ]
        results = list(await asyncio.gather(*tasks))
        duration = time.perf_counter() - start
        progress.close()
    return results, duration, model


def make_requests(args: argparse.Namespace, tokenizer: Any) -> list[SampleRequest]:
    from_file = dataset_requests(args, tokenizer)
    if from_file is not None:
        return from_file
    return random_text_requests(
        tokenizer, args.num_prompts, args.input_len, args.output_len, args.prefix_len, args.seed
    )


def main(args: argparse.Namespace) -> None:
    tokenizer = load_tokenizer(args.tokenizer)
    requests = make_requests(args, tokenizer)
    percentiles = [float(p) for p in args.metric_percentiles.split(",") if p.strip()]
    results, duration, model = asyncio.run(
        run_benchmark(
            args.base_url,
            requests,
            tokenizer,
            model=args.model,
            endpoint=args.endpoint,
            request_rate=args.request_rate,
            burstiness=args.burstiness,
            max_concurrency=args.max_concurrency,
            ignore_eos=args.ignore_eos,
            temperature=args.temperature,
            seed=args.seed,
            test_request=not args.skip_test_request,
            disable_tqdm=args.disable_tqdm,
        )
    )
    metrics = compute_metrics(results, duration, percentiles)
    embeddings = _endpoint_path(args.endpoint).endswith("/embeddings")
    report = format_report(
        metrics, percentiles, args.request_rate, args.max_concurrency, only_e2el=embeddings
    )
    print(report)
    errors = [r.error for r in results if not r.success]
    if errors:
        print(f"first error: {errors[0]}")
    if args.save_result:
        record = {
            "date": datetime.now().isoformat(timespec="seconds"),
            "base_url": args.base_url,
            "endpoint": args.endpoint,
            "model": model,
            "num_prompts": len(requests),
            "request_rate": args.request_rate if math.isfinite(args.request_rate) else "inf",
            "burstiness": args.burstiness,
            "max_concurrency": args.max_concurrency,
            **metrics,
            **per_request_details(results),
        }
        with open(args.save_result, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)


if __name__ == "__main__":
    _parser = argparse.ArgumentParser(description=__doc__)
    add_cli_args(_parser)
    main(_parser.parse_args())
