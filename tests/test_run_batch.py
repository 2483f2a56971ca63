"""``pagedserve run-batch``: a file of OpenAI batch requests answered in order, each line as the
HTTP API would answer it, a bad line failing alone."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.entrypoints.cli import main

NAME = "tiny"
CHAT = {"role": "user", "content": "Tell me a story"}


def batch_line(custom_id: str, url: str, body: dict, **extra) -> str:
    return json.dumps({"custom_id": custom_id, "method": "POST", "url": url, "body": body, **extra})


def run(tmp_path, model: str, lines: list[str], *flags: str) -> list[dict]:
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text("\n".join(lines) + "\n")
    argv = ["run-batch", "-i", str(source), "-o", str(target), model, "--served-model-name", NAME]
    assert main([*argv, "--dtype", "float32", "--log-level", "WARNING", *flags]) == 0
    return [json.loads(line) for line in target.read_text().splitlines()]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tiny_model_dir("llama")


def test_generation_lines_answer_in_order_and_fail_alone(tmp_path, llama):
    chat = {"model": NAME, "messages": [CHAT], "max_tokens": 5, "temperature": 0}
    completion = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 7, "temperature": 0}
    lines = [
        batch_line("chat", "/v1/chat/completions", chat),
        batch_line("completion", "/v1/completions", completion),
        batch_line("bad-temperature", "/v1/completions", {**completion, "temperature": -1}),
        batch_line("other-model", "/v1/chat/completions", {**chat, "model": "gpt-4o"}),
        batch_line("stream", "/v1/chat/completions", {**chat, "stream": True}),
        batch_line("unknown-url", "/v1/images/generations", {"prompt": "a cat"}),
        batch_line("get", "/v1/completions", completion, method="GET"),
        "{not json",
        "",
        batch_line("chat-again", "/v1/chat/completions", {**chat, "max_tokens": 3}),
    ]
    results = run(tmp_path, llama, lines)
    ids = ["chat", "completion", "bad-temperature", "other-model", "stream", "unknown-url", "get"]
    assert [r["custom_id"] for r in results] == [*ids, None, "chat-again"]
    assert len({r["id"] for r in results}) == len({r["response"]["request_id"] for r in results})
    assert len({r["id"] for r in results}) == 9

    llm = LLM(llama, dtype="float32")
    chat_text = llm.chat([CHAT], SamplingParams(temperature=0, max_tokens=5), use_tqdm=False)
    params = SamplingParams(temperature=0, max_tokens=7)
    completion_text = llm.generate(["Once upon a time"], params, use_tqdm=False)
    by_id = {r["custom_id"]: r for r in results}
    answer = by_id["chat"]["response"]
    assert answer["status_code"] == 200 and by_id["chat"]["error"] is None
    assert answer["body"]["object"] == "chat.completion"
    assert answer["body"]["model"] == NAME
    assert answer["body"]["choices"][0]["message"]["content"] == chat_text[0].outputs[0].text
    assert answer["body"]["usage"]["completion_tokens"] == 5
    answer = by_id["completion"]["response"]
    assert answer["body"]["choices"][0]["text"] == completion_text[0].outputs[0].text
    assert by_id["chat-again"]["response"]["body"]["usage"]["completion_tokens"] == 3

    def error(custom_id: str | None) -> tuple[int, dict]:
        result = results[[r["custom_id"] for r in results].index(custom_id)]
        assert result["response"]["body"] == {"error": result["error"]}
        return result["response"]["status_code"], result["error"]

    status, err = error("bad-temperature")
    assert status == 400 and err["param"] == "temperature"
    assert err["type"] == "invalid_request_error"
    status, err = error("other-model")
    assert status == 404 and "gpt-4o" in err["message"]
    for custom_id, text in [
        ("stream", "stream"),
        ("unknown-url", "/v1/images/generations"),
        ("get", "POST"),
        (None, "not valid JSON"),
    ]:
        status, err = error(custom_id)
        assert status == 400 and text in err["message"]


def test_embedding_and_score_lines(tmp_path, tiny_model_dir):
    qwen3 = tiny_model_dir("qwen3")
    texts = ["The quick brown fox", "Embeddings turn text into vectors."]
    lines = [
        batch_line("embed", "/v1/embeddings", {"model": NAME, "input": texts}),
        batch_line("score", "/score", {"model": NAME, "text_1": texts[0], "text_2": texts[1]}),
        batch_line("chat", "/v1/chat/completions", {"model": NAME, "messages": [CHAT]}),
    ]
    results = run(tmp_path, qwen3, lines, "--runner", "pooling")
    embed, score, chat = (r["response"] for r in results)
    llm = LLM(qwen3, runner="pooling", dtype="float32")
    vectors = [o.outputs.embedding for o in llm.embed(texts, use_tqdm=False)]
    got = [d["embedding"] for d in embed["body"]["data"]]
    torch.testing.assert_close(torch.tensor(got), torch.tensor(vectors), atol=1e-6, rtol=0)
    cosine = torch.nn.functional.cosine_similarity(*torch.tensor(vectors), dim=0).item()
    assert score["body"]["data"][0]["score"] == pytest.approx(cosine, abs=1e-5)
    assert chat["status_code"] == 400 and results[2]["error"]["message"]


class _Files(BaseHTTPRequestHandler):
    """GET /in.jsonl serves the batch; PUT /out.jsonl keeps what was sent."""

    batch = b""
    uploaded: dict[str, bytes] = {}

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.batch)))
        self.end_headers()
        self.wfile.write(self.batch)

    def do_PUT(self) -> None:  # noqa: N802
        length = int(self.headers.get("Content-Length", 0))
        self.uploaded[self.path] = self.rfile.read(length)
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def test_urls_in_and_out(llama):
    body = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}
    _Files.batch = "\n".join(
        batch_line(f"r{i}", "/v1/completions", body) for i in range(3)
    ).encode()
    httpd = HTTPServer(("127.0.0.1", 0), _Files)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    try:
        argv = ["run-batch", "-i", f"{base}/in.jsonl", "-o", f"{base}/out.jsonl", llama]
        assert main([*argv, "--dtype", "float32", "--log-level", "WARNING"]) == 0
    finally:
        httpd.shutdown()
    results = [json.loads(line) for line in _Files.uploaded["/out.jsonl"].splitlines()]
    assert [r["custom_id"] for r in results] == ["r0", "r1", "r2"]
    texts = {r["response"]["body"]["choices"][0]["text"] for r in results}
    assert len(texts) == 1 and all(r["error"] is None for r in results)


def test_the_model_may_be_given_as_vllms_model_flag(tmp_path, llama):
    """``--model`` as vLLM's run-batch takes it (it once matched ``--model-impl`` as an
    abbreviation in serve, and nothing in run-batch)."""
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    source.write_text(batch_line("a", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}))
    argv = ["run-batch", "-i", str(source), "-o", str(target), "--model", llama]
    assert main([*argv, "--dtype", "float32", "--log-level", "WARNING"]) == 0
    (result,) = [json.loads(line) for line in target.read_text().splitlines()]
    assert result["response"]["body"]["model"] == llama


def test_a_missing_input_file_stops_before_loading(tmp_path, llama):
    argv = ["run-batch", "-i", str(tmp_path / "nowhere.jsonl"), "-o", str(tmp_path / "o"), llama]
    with pytest.raises(SystemExit, match="nowhere.jsonl: no such file"):
        main(argv)
    assert not (tmp_path / "o").exists()


def test_an_unreachable_output_url_fails_the_run(tmp_path, llama):
    source = tmp_path / "in.jsonl"
    source.write_text(batch_line("a", "/v1/completions", {"prompt": "Hi", "max_tokens": 1}))
    argv = ["run-batch", "-i", str(source), "-o", "http://127.0.0.1:9/out.jsonl", llama]
    assert main([*argv, "--dtype", "float32", "--log-level", "WARNING"]) == 1


def test_a_line_that_fails_inside_the_server_fails_alone(tmp_path, llama, monkeypatch):
    """An exception in a handler is a 500 for its line only."""
    from pagedserve.entrypoints.openai.serving_completion import ServingCompletion

    create = ServingCompletion.create

    async def failing(self, req, raw):
        if req.prompt == "explode":
            raise RuntimeError("boom")
        return await create(self, req, raw)

    monkeypatch.setattr(ServingCompletion, "create", failing)
    body = {"model": NAME, "max_tokens": 2}
    lines = [
        batch_line("bad", "/v1/completions", {**body, "prompt": "explode"}),
        batch_line("good", "/v1/completions", {**body, "prompt": "Hello"}),
    ]
    bad, good = run(tmp_path, llama, lines)
    assert bad["response"]["status_code"] == 500 and bad["error"]["type"] == "server_error"
    assert good["response"]["status_code"] == 200


def test_malformed_lines_fail_alone(tmp_path, llama):
    """Lines no JSON parser reads (nested past Python's recursion limit, or not UTF-8) and a
    background response (whose answer would be lost when the run ends) are 400s of their own;
    the other lines are answered, the first one after a byte order mark too."""
    good = batch_line("good", "/v1/completions", {"model": NAME, "prompt": "Hi", "max_tokens": 1})
    background = {"model": NAME, "input": "Hi", "background": True}
    source, target = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    deep = "[" * 100_000 + "]" * 100_000
    lines = [f"\ufeff{good}", deep, batch_line("bg", "/v1/responses", background)]
    source.write_bytes("\n".join(lines).encode() + b'\n{"custom_id": "\xff\xfe"}\n')
    argv = ["run-batch", "-i", str(source), "-o", str(target), llama, "--served-model-name", NAME]
    assert main([*argv, "--dtype", "float32", "--log-level", "WARNING"]) == 0
    results = [json.loads(line) for line in target.read_text().splitlines()]
    assert [r["response"]["status_code"] for r in results] == [200, 400, 400, 400]
    assert results[0]["custom_id"] == "good" and results[0]["error"] is None
    assert "nested too deeply" in results[1]["error"]["message"]
    assert "background" in results[2]["error"]["message"] and results[2]["custom_id"] == "bg"
    assert "UTF-8" in results[3]["error"]["message"]
