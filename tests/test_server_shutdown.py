"""SIGTERM / SIGINT during traffic: the server stops accepting, lets the requests in flight finish,
and exits with status 0 and no traceback."""

from __future__ import annotations

import signal
import socket
import threading
import time

import pytest
from server_utils import MODEL_NAME, ServerProcess, metrics

MAX_TOKENS = 200


def stream_completion(
    server: ServerProcess, results: list, started: threading.Event, chunks: list
) -> None:
    client = server.client(timeout=120)
    text, reasons = "", []
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt="Tell me a story.",
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    usage = None
    for chunk in stream:
        started.set()
        chunks.append(chunk)
        for choice in chunk.choices:
            text += choice.text
            reasons.append(choice.finish_reason)
        usage = chunk.usage or usage
    results.append((text, [r for r in reasons if r], usage.completion_tokens))


def refuses_connections(url: str) -> bool:
    host, port = url.removeprefix("http://").split(":")
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return True
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_during_traffic_exits_cleanly(sig, tiny_model_dir):
    server = ServerProcess(
        [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME, "--kv-cache-memory", "0.05"]
    ).wait_ready()
    try:
        results: list = []
        chunks: list = []
        events = [threading.Event() for _ in range(4)]
        threads = [
            threading.Thread(target=stream_completion, args=(server, results, e, chunks))
            for e in events
        ]
        for t in threads:
            t.start()
        for e in events:
            assert e.wait(120)
        assert metrics(server.url)["pagedserve:num_requests_running"] >= 1
        server.proc.send_signal(sig)
        chunks_before_signal = len(chunks)
        deadline = time.monotonic() + 30
        while not refuses_connections(server.url):
            assert time.monotonic() < deadline, "still accepting connections after the signal"
            time.sleep(0.05)
        for t in threads:
            t.join(120)
        assert server.proc.wait(60) == 0
        output = server.output()
        assert "Traceback" not in output and "Error" not in output, output
        # the requests in flight ran to completion, streaming on after the signal
        assert len(chunks) > chunks_before_signal
        assert len(results) == 4
        for _text, reasons, completion_tokens in results:
            assert reasons == ["length"] and completion_tokens == MAX_TOKENS
    finally:
        server.close()
