"""A real ``pagedserve serve`` process for tests, on a free loopback port, plus raw-HTTP helpers."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import openai

REPO = Path(__file__).resolve().parent.parent
MODEL_NAME = "test-model"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m pagedserve serve ARGS`` on 127.0.0.1, started and stopped by a test."""

    def __init__(
        self,
        args: list[str],
        env: dict[str, str] | None = None,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        """``ssl_context``: the server speaks HTTPS, and this context trusts its certificate."""
        self.port = free_port()
        self.ssl_context = ssl_context
        self.url = f"{'https' if ssl_context else 'http'}://127.0.0.1:{self.port}"
        self._log = tempfile.NamedTemporaryFile("w+", prefix="pagedserve-", suffix=".log")
        cmd = [sys.executable, "-m", "pagedserve", "serve", *args]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--stats-interval", "2"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**os.environ, **(env or {})},
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def wait_ready(self, timeout: float = 240.0) -> ServerProcess:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                health = self.url + "/health"
                with urllib.request.urlopen(health, timeout=2, context=self.ssl_context) as resp:
                    if resp.status == 200:
                        return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.25)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout} s:\n{self.output()}")

    def output(self) -> str:
        self._log.flush()
        return Path(self._log.name).read_text()

    def client(self, api_key: str = "unused", **kwargs: Any) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs)

    def async_client(self, api_key: str = "unused", **kwargs: Any) -> openai.AsyncOpenAI:
        return openai.AsyncOpenAI(
            base_url=self.url + "/v1", api_key=api_key, max_retries=0, **kwargs
        )

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def close(self) -> None:
        self.stop()
        self._log.close()


CHAT = [{"role": "user", "content": "Name three colours."}]
PROMPT = "The capital of France is"


def greedy_chat(client: openai.OpenAI, **kwargs: Any) -> Any:
    """A greedy chat completion of CHAT on MODEL_NAME (``kwargs`` override)."""
    args = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 24, "temperature": 0}
    return client.chat.completions.create(**{**args, **kwargs})


def greedy_completion(client: openai.OpenAI, **kwargs: Any) -> Any:
    """A greedy completion of PROMPT on MODEL_NAME (``kwargs`` override)."""
    args = {"model": MODEL_NAME, "prompt": PROMPT, "max_tokens": 16, "temperature": 0}
    return client.completions.create(**{**args, **kwargs})


def packaged_server(*args: str) -> ServerProcess:
    """The packaged SmolLM2 served as MODEL_NAME (2048-token context, 0.5 GiB of KV cache), ready;
    ``args`` are more server flags."""
    flags = [
        "--served-model-name",
        MODEL_NAME,
        "--max-model-len",
        "2048",
        "--kv-cache-memory",
        "0.5",
    ]
    return ServerProcess([*flags, *args]).wait_ready()


# A chat template that writes each message as <role>content (tiny models have none of their own).
ROLE_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)


def templated_server(
    directory: Path, model: str, template: str, *args: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """``model`` served as MODEL_NAME with the chat ``template`` (written into ``directory``),
    ready; ``args`` are more server flags."""
    path = directory / "template.jinja"
    path.write_text(template)
    flags = [model, "--served-model-name", MODEL_NAME, "--chat-template", str(path)]
    return ServerProcess([*flags, *args], env=env).wait_ready()


def role_template_server(
    tmp_path_factory: Any, model: str, *args: str, env: dict[str, str] | None = None
) -> ServerProcess:
    """``model`` served with :data:`ROLE_TEMPLATE` as its chat template and ``args``."""
    return templated_server(
        tmp_path_factory.mktemp("template"), model, ROLE_TEMPLATE, *args, env=env
    )


def request(
    url: str,
    method: str = "GET",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One HTTP request; returns (status, parsed JSON or text). ``body`` bytes go as they are."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    hdrs = {"Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(url, data=data, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=120) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as err:
        status, raw = err.code, err.read()
    text = raw.decode()
    try:
        return status, json.loads(text)
    except json.JSONDecodeError:
        return status, text


_SAMPLE = re.compile(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$")


def metrics(url: str) -> dict[str, float]:
    """GET /metrics as {name: value} (summed over labels) and {name{labels}: value}."""
    status, text = request(url + "/metrics")
    assert status == 200
    values: dict[str, float] = {}
    for line in text.splitlines():
        match = _SAMPLE.match(line)
        if match:
            name, labels, value = match.group(1), match.group(2), float(match.group(3))
            values[name] = values.get(name, 0.0) + value
            if labels:
                values[name + labels] = value
    return values


def wait_until_idle(url: str, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs or waits and no KV block is in use; return the metrics."""
    deadline = time.monotonic() + timeout
    while True:
        m = metrics(url)
        idle = (
            m["pagedserve:num_requests_running"] == 0
            and m["pagedserve:num_requests_waiting"] == 0
            and m["pagedserve:kv_cache_usage_perc"] == 0
        )
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.1)


def open_stream(
    url: str, path: str, body: dict[str, Any]
) -> tuple[http.client.HTTPConnection, Any]:
    """Start a streaming POST and return the connection and response, to read a little and
    then drop (a client that disconnects mid-stream)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    return conn, resp
