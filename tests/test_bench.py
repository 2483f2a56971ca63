"""Functional tests of the benchmark tools (no timing is asserted)."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
from pathlib import Path

import pytest
from bench_stub_server import PROMPT_TOKENS, StubServer, StubState
from tiny_models import write_lora_adapter

from pagedserve import LLM
from pagedserve.bench import latency, serve, throughput
from pagedserve.bench.datasets import (
    allowed_token_ids,
    file_requests,
    random_text_requests,
    random_token_requests,
    sharegpt_requests,
)
from pagedserve.bench.serve_metrics import compute_metrics, format_report


@pytest.fixture
def tokenizer(smollm2_tokenizer):
    return smollm2_tokenizer


def _parse(module, argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    module.add_cli_args(parser)
    return parser.parse_args(argv)


def test_random_text_prompts_have_the_requested_length(tokenizer):
    requests = random_text_requests(tokenizer, 8, input_len=50, output_len=7, seed=1)
    assert len(requests) == 8
    assert len({r.prompt for r in requests}) == 8
    for r in requests:
        assert r.expected_output_len == 7
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
        assert abs(r.prompt_len - 50) <= 2
    assert sum(r.prompt_len == 50 for r in requests) >= 6


def test_random_text_prompts_share_the_prefix(tokenizer):
    requests = random_text_requests(tokenizer, 3, input_len=20, output_len=4, prefix_len=40)
    first = requests[0].prompt
    prefix = tokenizer.decode(tokenizer.encode(first, add_special_tokens=False)[:30])
    assert all(r.prompt.startswith(prefix) for r in requests)
    assert all(abs(r.prompt_len - 60) <= 2 for r in requests)


def test_random_token_prompts_are_exact_and_avoid_special_tokens(tokenizer):
    vocab = allowed_token_ids(tokenizer)
    special = set(tokenizer.all_special_ids)
    requests = random_token_requests(vocab, 4, input_len=16, output_len=3, prefix_len=8)
    for r in requests:
        assert len(r.prompt) == r.prompt_len == 24
        assert r.prompt[:8] == requests[0].prompt[:8]
        assert not special & set(r.prompt)


def test_file_dataset(tmp_path, tokenizer):
    path = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "Hello there", "output_len": 5}, {"prompt": "What is 2+2?"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    requests = file_requests(path, tokenizer, default_output_len=9)
    assert [r.expected_output_len for r in requests] == [5, 9]
    assert requests[1].prompt_len == len(tokenizer.encode("What is 2+2?", add_special_tokens=False))
    assert len(file_requests(path, tokenizer, 9, num_prompts=1)) == 1


def _run_against_stub(state: StubState, requests, tokenizer, **kwargs):
    async def go():
        async with StubServer(state) as base_url:
            return await serve.run_benchmark(
                base_url, requests, tokenizer, disable_tqdm=True, **kwargs
            )

    return asyncio.run(go())


@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_serve_counts_tokens_from_usage(tokenizer, endpoint):
    requests = random_text_requests(tokenizer, 6, input_len=16, output_len=5)
    state = StubState()
    results, duration, model = _run_against_stub(
        state, requests, tokenizer, endpoint=endpoint, ignore_eos=True
    )
    assert model == "stub-model"
    assert duration > 0
    assert all(r.success for r in results)
    assert [r.output_tokens for r in results] == [5] * 6
    assert all(len(r.itl) == 4 and 0 < r.ttft <= r.latency for r in results)
    benchmark_bodies = state.bodies[1:]  # the first is the test request
    assert len(benchmark_bodies) == 6
    for body in benchmark_bodies:
        assert body["ignore_eos"] is True and body["stream"] is True
        assert body["stream_options"] == {"include_usage": True}
        assert ("messages" in body) == (endpoint == "chat")
    metrics = compute_metrics(results, duration, [99.0])
    assert metrics["completed"] == 6 and metrics["failed"] == 0
    assert metrics["total_output_tokens"] == 30
    assert metrics["total_input_tokens"] == 6 * PROMPT_TOKENS  # the server's count wins
    assert metrics["mean_tpot_ms"] > 0 and metrics["p99_itl_ms"] > 0


def test_serve_counts_tokens_by_tokenizing_without_usage(tokenizer):
    requests = random_text_requests(tokenizer, 3, input_len=8, output_len=6)
    results, _, _ = _run_against_stub(StubState(send_usage=False), requests, tokenizer)
    expected = len(tokenizer.encode(" the" * 6, add_special_tokens=False))
    assert [r.output_tokens for r in results] == [expected] * 3
    assert all(r.generated_text == " the" * 6 for r in results)
    assert [r.prompt_len for r in results] == [r.prompt_len for r in requests]


def test_serve_respects_max_concurrency_and_reports_failures(tokenizer):
    requests = random_text_requests(tokenizer, 8, input_len=8, output_len=4)
    state = StubState(fail_every=4)
    results, _, _ = _run_against_stub(
        state, requests, tokenizer, max_concurrency=2, request_rate=1000.0, test_request=False
    )
    assert state.max_in_flight <= 2
    assert sum(not r.success for r in results) == 2
    assert all("500" in r.error for r in results if not r.success)
    metrics = compute_metrics(results, 1.0, [50.0, 99.0])
    assert (metrics["completed"], metrics["failed"]) == (6, 2)
    report = format_report(metrics, [50.0, 99.0], 1000.0, 2)
    for label in [
        "Successful requests:",
        "Failed requests:",
        "Median TTFT (ms):",
        "P99 TPOT (ms):",
        "Mean ITL (ms):",
        "P50 E2EL (ms):",
        "Output token throughput (tok/s):",
        "Maximum request concurrency:",
    ]:
        assert label in report


def test_serve_main_prints_report_and_saves_json(tmp_path, tokenizer, capsys, monkeypatch):
    state = StubState()
    out = tmp_path / "result.json"

    async def fake_run(base_url, requests, tok, **kwargs):
        async with StubServer(state) as url:
            return await original(url, requests, tok, **kwargs)

    original = serve.run_benchmark
    monkeypatch.setattr(serve, "run_benchmark", fake_run)
    monkeypatch.setattr(serve, "load_tokenizer", lambda name: tokenizer)
    args = _parse(
        serve,
        [
            "--num-prompts",
            "4",
            "--input-len",
            "12",
            "--output-len",
            "3",
            "--ignore-eos",
            "--save-result",
            str(out),
            "--disable-tqdm",
        ],
    )
    serve.main(args)
    printed = capsys.readouterr().out
    assert "Serving Benchmark Result" in printed and "Successful requests:" in printed
    saved = json.loads(out.read_text())
    assert saved["completed"] == 4 and saved["total_output_tokens"] == 12
    assert saved["request_rate"] == "inf" and saved["model"] == "stub-model"
    assert len(saved["ttfts"]) == 4 and saved["output_lens"] == [3] * 4


def test_throughput_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "throughput.json"
    argv = [
        "--model",
        tiny_model_dir("llama"),
        "--num-prompts",
        "4",
        "--input-len",
        "8",
        "--output-len",
        "8",
        "--output-json",
        str(out),
        "--disable-tqdm",
    ]
    throughput.main(_parse(throughput, argv))
    printed = capsys.readouterr().out
    assert "requests/s" in printed and "total tokens/s" in printed and "output tokens/s" in printed
    result = json.loads(out.read_text())
    assert result["num_requests"] == 4
    assert result["total_prompt_tokens"] == 32 and result["total_output_tokens"] == 32
    assert result["output_tokens_per_second"] > 0


def test_throughput_with_an_adapter(tmp_path, tiny_model_dir, monkeypatch):
    """--lora-path: every request runs with that adapter (the engine sized for its rank)."""
    write_lora_adapter(tmp_path / "adapter", "llama", seed=1, rank=4)
    seen = []
    generate = LLM.generate

    def recording(self, *args, **kwargs):
        seen.append((kwargs["lora_request"], self.llm_engine.config.max_lora_rank))
        return generate(self, *args, **kwargs)

    monkeypatch.setattr(LLM, "generate", recording)
    argv = ["--model", tiny_model_dir("llama"), "--num-prompts", "2", "--input-len", "8",
            "--output-len", "4", "--disable-tqdm", "--lora-path", str(tmp_path / "adapter"),
            "--output-json", str(tmp_path / "r.json")]  # fmt: skip
    throughput.main(_parse(throughput, argv))
    ((lora, rank),) = seen
    assert lora.lora_path == str(tmp_path / "adapter") and rank == 4
    assert json.loads((tmp_path / "r.json").read_text())["total_output_tokens"] == 8


def test_throughput_from_a_file(tmp_path, tiny_model_dir, capsys):
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"prompt": "Hi there", "output_len": 3}\n{"prompt": "Tell me"}\n')
    argv = [
        "--model",
        tiny_model_dir("llama"),
        "--dataset",
        str(path),
        "--output-len",
        "5",
        "--disable-tqdm",
        "--output-json",
        str(tmp_path / "r.json"),
    ]
    throughput.main(_parse(throughput, argv))
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["num_requests"] == 2 and result["total_output_tokens"] == 8


def test_latency_on_a_tiny_model(tmp_path, tiny_model_dir, capsys):
    out = tmp_path / "latency.json"
    argv = [
        "--model",
        tiny_model_dir("llama"),
        "--batch-size",
        "2",
        "--input-len",
        "8",
        "--output-len",
        "4",
        "--num-iters-warmup",
        "1",
        "--num-iters",
        "3",
        "--output-json",
        str(out),
        "--disable-tqdm",
    ]
    latency.main(_parse(latency, argv))
    printed = capsys.readouterr().out
    assert "Avg latency:" in printed and "99% percentile latency:" in printed
    result = json.loads(out.read_text())
    assert len(result["latencies"]) == 3
    assert set(result["percentiles"]) == {"10", "25", "50", "75", "90", "99"}


def _compare_table():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "compare_table.py"
    spec = importlib.util.spec_from_file_location("compare_table", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_compare_table_adds_llamacpp_columns_only_when_it_ran(tmp_path):
    compare_table = _compare_table()
    for who, tok_s in (("vllm", 400.0), ("ours", 600.0)):
        (tmp_path / f"{who}-burst.json").write_text(json.dumps({"output_throughput": tok_s}))
    without = compare_table.table(tmp_path)
    assert "llama.cpp" not in without
    assert "| serve 64 at once, 128/128 | tok/s | 400.0 | 600.0 | 1.50 | >= 1.2 | yes |" in without

    (tmp_path / "llamacpp-burst.json").write_text(
        json.dumps({"output_throughput": 300.0, "failed": 2})
    )
    with_it = compare_table.table(tmp_path)
    assert "| ours / vLLM | target | met | llama.cpp | ours / llama.cpp |" in with_it
    assert "| 1.50 | >= 1.2 | yes | 300.0 | 2.00 |" in with_it
    assert "llamacpp-burst: 2 failed" in with_it


def _sharegpt_file(path: Path) -> tuple[list[str], list[str]]:
    """A ShareGPT file: two usable conversations (their prompts and replies) among ones vLLM's
    filter drops (a prompt under 4 tokens, one over 1024, a single turn)."""
    kept = [
        ("Tell me about the moon, please", "The moon is Earth's only natural satellite."),
        ("Write a haiku about autumn leaves", "Red leaves drift and fall, autumn says goodbye."),
    ]
    dropped = [("Hi", "Hello, how can I help you today?"), ("word " * 1100, "ok ok ok ok ok")]

    def conversation(prompt: str, reply: str) -> dict:
        turns = [{"from": "human", "value": prompt}, {"from": "gpt", "value": reply}]
        return {"id": prompt[:8], "conversations": turns}

    data = [conversation(*c) for c in dropped + kept]
    data.append({"id": "one", "conversations": [{"from": "human", "value": "Only one turn"}]})
    path.write_text(json.dumps(data))
    return [p for p, _ in kept], [r for _, r in kept]


def test_sharegpt_dataset(tmp_path, tokenizer):
    path = tmp_path / "sharegpt.json"
    prompts, replies = _sharegpt_file(path)
    requests = sharegpt_requests(path, tokenizer, num_prompts=10, seed=0)
    assert sorted(r.prompt for r in requests) == sorted(prompts)
    for r in requests:
        reply = replies[prompts.index(r.prompt)]
        assert r.prompt_len == len(tokenizer.encode(r.prompt, add_special_tokens=False))
        assert r.expected_output_len == len(tokenizer.encode(reply, add_special_tokens=False))
    fixed = sharegpt_requests(path, tokenizer, num_prompts=10, seed=0, output_len=7)
    assert [r.expected_output_len for r in fixed] == [7, 7]
    assert len(sharegpt_requests(path, tokenizer, num_prompts=1, seed=3)) == 1


def test_throughput_on_sharegpt(tmp_path, tiny_model_dir, tokenizer):
    path = tmp_path / "sharegpt.json"
    _, replies = _sharegpt_file(path)
    argv = ["--model", tiny_model_dir("llama"), "--dataset-name", "sharegpt", "--disable-tqdm"]
    with pytest.raises(ValueError, match="needs --dataset-path"):
        throughput.main(_parse(throughput, argv))
    out = tmp_path / "r.json"
    throughput.main(
        _parse(throughput, [*argv, "--dataset-path", str(path), "--output-json", str(out)])
    )
    result = json.loads(out.read_text())
    expected = sum(len(tokenizer.encode(r, add_special_tokens=False)) for r in replies)
    assert result["num_requests"] == 2 and result["total_output_tokens"] == expected
