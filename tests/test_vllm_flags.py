"""vLLM's launch flags and ``LLM`` arguments that scripts carry over: CORS, logging, the proxy
path, the GPU memory share, chunked prefill on or off, the parallel sizes (1 only), ``--config``
files, ``--middleware``, and the flags accepted with no effect or refused."""

from __future__ import annotations

import http.client
import json
import ssl
import subprocess
import sys
from urllib.parse import urlparse

import pytest
from server_utils import MODEL_NAME, REPO, ServerProcess

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.vllm_launch_flags import add_middlewares, with_config_file

APP = "http://app.example"


def call(
    url: str,
    method: str,
    path: str,
    headers: dict[str, str],
    body: str | None = None,
    context: ssl.SSLContext | None = None,
):
    """One request (HTTPS with ``context``); returns (status, headers in lower case, body)."""
    parts = urlparse(url)
    if context is not None:
        conn = http.client.HTTPSConnection(parts.hostname, parts.port, timeout=60, context=context)
    else:
        conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


PREFLIGHT = {
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization",
}


def test_cors_is_closed_by_default(server):
    """As vLLM 0.32: no browser on another origin may call the API unless --allowed-origins
    names it."""
    status, headers, _ = call(
        server.url, "OPTIONS", "/v1/chat/completions", {"Origin": APP, **PREFLIGHT}
    )
    assert status == 400 and "access-control-allow-origin" not in headers
    status, headers, _ = call(server.url, "GET", "/v1/models", {"Origin": APP})
    assert status == 200 and "access-control-allow-origin" not in headers


MIDDLEWARE = """
class Stamp:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        async def stamped(message):
            if message["type"] == "http.response.start":
                message.setdefault("headers", []).append((b"x-stamp", b"yes"))
            await send(message)

        await self.app(scope, receive, stamped)
"""

# A vLLM deployment's config file: flags this server honours, and flags that change nothing
# here (graph capture, downloads, swap space, ...), as vLLM's --config takes them.
CONFIG = """
served_model_name: [other-name]
max_num_batched_tokens: 16
enable_prefix_caching: false
swap_space: 4
download_dir: /nowhere
load_format: auto
tokenizer_mode: auto
max_seq_len_to_capture: 8192
disable_custom_all_reduce: true
distributed_executor_backend: mp
compilation_config: {"level": 3}
quantization: gguf
data_parallel_size: 1
middleware: [stamp_middleware.Stamp]
"""


def test_server_flags(tiny_model_dir, tmp_path):
    (tmp_path / "stamp_middleware.py").write_text(MIDDLEWARE)
    (tmp_path / "vllm.yaml").write_text(CONFIG)
    srv = ServerProcess(
        [
            tiny_model_dir("llama"),
            "--config", str(tmp_path / "vllm.yaml"),
            "--served-model-name", MODEL_NAME,  # the command line wins over the file
            "--api-key", "secret",
            "--allowed-origins", f'["{APP}"]',
            "--allow-credentials",
            "--root-path", "/llm",
            "-tp", "1",
            "--trust-remote-code",
            "--disable-log-requests",
            "--disable-log-stats",
            "--uvicorn-log-level", "warning",
            "--gpu-memory-utilization", "0.9",
            "--no-enable-chunked-prefill",
            "--max-num-batched-tokens", "16",
            "--max-logprobs", "30",
        ],
        env={"PYTHONPATH": str(tmp_path)},
    ).wait_ready()  # fmt: skip
    try:
        # The preflight carries no API key, and is answered before the key is checked.
        status, headers, _ = call(
            srv.url, "OPTIONS", "/v1/completions", {"Origin": APP, **PREFLIGHT}
        )
        assert status == 200 and headers["access-control-allow-origin"] == APP
        assert headers["access-control-allow-credentials"] == "true"
        status, headers, _ = call(
            srv.url, "OPTIONS", "/v1/completions", {"Origin": "http://other.example", **PREFLIGHT}
        )
        assert status == 400 and "access-control-allow-origin" not in headers
        body = json.dumps({"model": MODEL_NAME, "prompt": "hi", "max_tokens": 3})
        auth = {"Authorization": "Bearer secret", "Content-Type": "application/json"}
        status, headers, _ = call(srv.url, "POST", "/v1/completions", {"Origin": APP, **auth}, body)
        assert status == 200 and headers["access-control-allow-origin"] == APP
        assert headers["x-stamp"] == "yes"  # --middleware, from the config file
        status, _, _ = call(srv.url, "POST", "/v1/completions", {"Origin": APP}, body)
        assert status == 401
        status, _, docs = call(srv.url, "GET", "/openapi.json", {"Authorization": "Bearer secret"})
        assert status == 200 and b'"/llm"' in docs  # served behind a proxy at /llm
        # A prompt past the step budget runs whole, in one step, without chunked prefill.
        big = json.dumps({"model": MODEL_NAME, "prompt": "word " * 60, "max_tokens": 2})
        assert call(srv.url, "POST", "/v1/completions", auth, big)[0] == 200
        # --max-logprobs 30: past OpenAI's 20 alternatives, up to the flag's.
        chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
        chat |= {"max_tokens": 2, "logprobs": True, "top_logprobs": 25}
        status, _, answer = call(srv.url, "POST", "/v1/chat/completions", auth, json.dumps(chat))
        tokens = json.loads(answer)["choices"][0]["logprobs"]["content"]
        assert status == 200 and [len(t["top_logprobs"]) for t in tokens] == [25, 25]
        chat["top_logprobs"] = 31
        status, _, answer = call(srv.url, "POST", "/v1/chat/completions", auth, json.dumps(chat))
        assert status == 400 and json.loads(answer)["error"]["param"] == "top_logprobs"
        completion = {"model": MODEL_NAME, "prompt": "hi there", "max_tokens": 1}
        completion |= {"prompt_logprobs": 30, "logprobs": 30}
        status, _, answer = call(srv.url, "POST", "/v1/completions", auth, json.dumps(completion))
        choice = json.loads(answer)["choices"][0]
        assert status == 200 and len(choice["logprobs"]["top_logprobs"][0]) >= 30
        assert len(choice["prompt_logprobs"][1]) >= 30
    finally:
        srv.stop()
    log = srv.output()
    srv.close()
    assert "trust_remote_code has no effect" in log
    assert "gpu_memory_utilization has no effect on the CPU" in log
    assert "Avg prompt throughput" not in log  # --disable-log-stats


def self_signed_certificate(directory) -> tuple[str, str]:
    """(key, certificate) files of a certificate for 127.0.0.1, made by openssl."""
    key, cert = directory / "key.pem", directory / "cert.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
         "-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    return str(key), str(cert)


def test_https_keys_request_ids_and_quiet_endpoints(tmp_path, tiny_model_dir):
    key, cert = self_signed_certificate(tmp_path)
    context = ssl.create_default_context(cafile=cert)
    srv = ServerProcess(
        [
            tiny_model_dir("llama"),
            "--served-model-name", MODEL_NAME,
            "--ssl-keyfile", key,
            "--ssl-certfile", cert,
            "--api-key", "first", "second",
            "--enable-request-id-headers",
            "--disable-fastapi-docs",
            "--disable-access-log-for-endpoints", "/health,/metrics",
        ],
        env={"VLLM_API_KEY": "third"},  # the flag wins over the environment
        ssl_context=context,
    ).wait_ready()  # fmt: skip
    try:

        def get(path: str, key: str, **headers: str):
            headers = {"Authorization": f"Bearer {key}", **headers}
            return call(srv.url, "GET", path, headers, context=context)

        for key in ("first", "second"):
            status, headers, _ = get("/v1/models", key)
            assert status == 200 and len(headers["x-request-id"]) == 32
        status, headers, _ = get("/v1/models", "third", **{"X-Request-Id": "my-id"})
        assert status == 401 and headers["x-request-id"] == "my-id"
        assert get("/docs", "first")[0] == 404 and get("/openapi.json", "first")[0] == 404
        assert get("/health", "first")[0] == 200
        with pytest.raises(ssl.SSLError):  # a client that does not trust the certificate
            call(srv.url, "GET", "/health", {}, context=ssl.create_default_context())
    finally:
        srv.stop()
    log = srv.output()
    srv.close()
    assert f"https://127.0.0.1:{srv.port}" in log
    assert '"GET /v1/models HTTP/1.1" 200' in log and '"GET /health' not in log


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--quantization", "awq"], "'awq' is not supported for --quantization"),
        (["--tool-parser-plugin", "mine.py"], "--tool-parser-plugin is not supported"),
        (["--skip-tokenizer-init"], "--skip-tokenizer-init is not supported"),
        (["-dp", "2"], "one process serves the model"),
        (["--tokenizer-mode", "mistral"], "'mistral' is not supported for --tokenizer-mode"),
        (["--config", "/nowhere.yaml"], "--config /nowhere.yaml"),
        (["--metrics-prefix", "1x"], "not starting with a digit"),
        (["--model", "other"], "the model is given twice: model and --model other"),
    ],
)
def test_vllm_flags_that_would_change_the_answers_are_refused(flags, says):
    done = subprocess.run(
        [sys.executable, "-m", "pagedserve", "serve", "model", *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode != 0 and says in done.stderr, done.stderr


def test_config_file_flags_go_after_the_model_and_before_the_command_lines(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: /from-file\nserved_model_name: [a, b]\nenable_prefix_caching: false\n"
    )
    flags = ["--served-model-name", "a", "b", "--no-enable-prefix-caching"]
    assert with_config_file(["serve", "--config", str(config), "--port", "1"]) == [
        "serve", "/from-file", *flags, "--port", "1"
    ]  # fmt: skip
    assert with_config_file(["serve", "/given", f"--config={config}", "--port", "1"]) == [
        "serve", "/given", *flags, "--port", "1"
    ]  # fmt: skip


def test_a_middleware_that_cannot_load_stops_the_start(tmp_path, monkeypatch):
    (tmp_path / "broken_mw.py").write_text("def oops(:\n")
    (tmp_path / "no_app_mw.py").write_text("class NoApp:\n    def __init__(self):\n        pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    from fastapi import FastAPI

    for path, says in (("broken_mw.oops", "SyntaxError"), ("no_app_mw.NoApp", "take the app")):
        with pytest.raises(SystemExit, match=says):
            add_middlewares(FastAPI(), [path])


def test_parallel_sizes_other_than_one_are_refused(tiny_model_dir):
    with pytest.raises(ValueError, match="one model on one device"):
        LLM(tiny_model_dir("llama"), tensor_parallel_size=2)
    done = subprocess.run(
        [sys.executable, "-m", "pagedserve", "serve", tiny_model_dir("llama"), "-pp", "2",
         "--port", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert done.returncode != 0
    assert "pipeline_parallel_size 2: pagedserve runs one model on one device" in (
        done.stdout + done.stderr
    )


def test_max_logprobs(tiny_model_dir):
    """20 alternatives by default, as vLLM; ``max_logprobs`` raises it, -1 to the vocabulary."""
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match=r"logprobs 21 is more than this engine returns: 20"):
        LLM(path).generate(["hi"], SamplingParams(max_tokens=1, logprobs=21), use_tqdm=False)
    with pytest.raises(ValueError, match="max_logprobs must be >= 0"):
        LLM(path, max_logprobs=-2)
    llm = LLM(path, dtype="float32", max_logprobs=-1)
    assert llm.llm_engine.max_logprobs == llm.llm_engine.model.config.vocab_size
    params = SamplingParams(temperature=0, max_tokens=2, logprobs=100, prompt_logprobs=50)
    out = llm.generate(["hi there"], params, use_tqdm=False)[0]
    assert [len(entry) for entry in out.outputs[0].logprobs] == [100, 100]
    assert all(len(entry) in (50, 51) for entry in out.prompt_logprobs[1:])


def test_engine_arguments(tiny_model_dir):
    """vLLM's ``LLM`` keywords: accepted, and chunked prefill off runs every prompt whole."""
    path = tiny_model_dir("llama")
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        LLM(path, gpu_memory_utilization=1.5)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = ["word " * 60, "a short one"]
    chunked = LLM(path, dtype="float32", max_num_batched_tokens=16)
    whole = LLM(
        path,
        dtype="float32",
        max_num_batched_tokens=16,
        enable_chunked_prefill=False,
        trust_remote_code=True,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.9,
    )
    scheduler = whole.llm_engine.scheduler
    assert not scheduler.chunked_prefill
    assert scheduler.max_num_batched_tokens == whole.llm_engine.max_model_len
    got = [o.outputs[0].token_ids for o in whole.generate(prompts, params, use_tqdm=False)]
    want = [o.outputs[0].token_ids for o in chunked.generate(prompts, params, use_tqdm=False)]
    assert got == want
