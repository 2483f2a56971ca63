"""vLLM's routes beside the API proper: the readiness probes ``/ready`` and ``/readyz``,
``/tokenizer_info`` (behind ``--enable-tokenizer-info-endpoint``), the render endpoints (behind
``--enable-scale-out``), ``/v1/chat/completions/batch``, and the dev mode's ``/pause``,
``/resume``, ``/is_paused`` and ``/abort_requests``. The server runs a tiny random model with
its own chat template and requires an API key, which the probes do not."""

from __future__ import annotations

import http.client
import json
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from server_utils import (
    MODEL_NAME,
    ROLE_TEMPLATE,
    ServerProcess,
    metrics,
    request,
    role_template_server,
    wait_until_idle,
)

KEY = "sk-admin-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = role_template_server(
        tmp_path_factory,
        tiny_model_dir("llama"),
        "--max-model-len", "256",
        "--kv-cache-memory", "0.05",
        "--enable-tokenizer-info-endpoint",
        "--enable-scale-out",
        env={"PAGEDSERVE_API_KEY": KEY, "PAGEDSERVE_SERVER_DEV_MODE": "1"},
    )  # fmt: skip
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def plain_server(tiny_model_dir):
    """The same model with none of the flags."""
    srv = ServerProcess([tiny_model_dir("llama"), "--served-model-name", MODEL_NAME])
    yield srv.wait_ready()
    srv.close()


def get(server, path, headers=AUTH):
    return request(server.url + path, "GET", None, headers)


def post(server, path, body, headers=AUTH):
    return request(server.url + path, "POST", body, headers)


def assert_error(body, status_type=None):
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    if status_type is not None:
        assert body["error"]["type"] == status_type


def test_readiness_probes_need_no_key(server):
    for path in ("/ready", "/readyz", "/health"):
        assert get(server, path, headers={}) == (200, "")
    status, body = post(server, "/ready", {}, headers={})
    assert status == 405
    assert_error(body)


def test_tokenizer_info(server):
    status, info = get(server, "/tokenizer_info")
    assert status == 200
    assert info["tokenizer_class"]
    assert info["chat_template"] == ROLE_TEMPLATE  # the one the server renders with
    assert info["eos_token"] == "<|im_end|>"
    assert "vocab_file" not in info
    status, body = get(server, "/tokenizer_info", headers={})
    assert status == 401
    assert_error(body)


def test_routes_off_without_their_flags(plain_server):
    status, body = get(plain_server, "/tokenizer_info")
    assert status == 404
    assert_error(body)
    for path in ("/pause", "/resume", "/abort_requests"):
        status, body = post(plain_server, path, {})
        assert status == 404
        assert_error(body)
    for path in ("/v1/chat/completions/render", "/v1/completions/render", "/v1/messages/render"):
        status, body = post(plain_server, path, {"model": MODEL_NAME, "prompt": "hi"})
        assert status == 403
        assert_error(body, "PermissionDeniedError")


def detokenized(server, ids):
    status, body = post(server, "/detokenize", {"tokens": ids})
    assert status == 200
    return body["prompt"]


def test_chat_render_is_the_prompt_that_would_run(server):
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 5, "temperature": 0}
    status, rendered = post(
        server, "/v1/chat/completions/render", body, {**AUTH, "X-Request-Id": "r1"}
    )
    assert status == 200, rendered
    assert rendered["request_id"] == "chatcmpl-r1"
    assert detokenized(server, rendered["token_ids"]) == "<user>hi<assistant>"
    params = rendered["sampling_params"]
    assert params["max_tokens"] == 5 and params["temperature"] == 0 and params["n"] == 1
    assert rendered["model"] == MODEL_NAME and rendered["stream"] is False
    status, answer = post(server, "/v1/chat/completions", {**body, "return_token_ids": True})
    assert status == 200
    assert answer["prompt_token_ids"] == rendered["token_ids"]


def test_completion_render_one_entry_per_prompt(server):
    body = {"model": MODEL_NAME, "prompt": ["one two", "three"], "request_id": "c"}
    status, rendered = post(server, "/v1/completions/render", body)
    assert status == 200, rendered
    assert [r["request_id"] for r in rendered] == ["cmpl-c-0", "cmpl-c-1"]
    assert [detokenized(server, r["token_ids"]) for r in rendered] == ["one two", "three"]
    assert rendered[0]["sampling_params"]["max_tokens"] == 16  # the API's default
    status, rendered = post(server, "/v1/completions/render", {"prompt": [5, 6, 7]})
    assert status == 200, rendered
    assert len(rendered) == 1 and rendered[0]["token_ids"] == [5, 6, 7]
    assert rendered[0]["request_id"].startswith("cmpl-")


def test_render_token_offsets(server):
    """vLLM's return_token_offsets: each prompt token's characters in the text it was tokenized
    from (a chat's as its template wrote it); null unless asked, and for token ids."""
    asked = {"model": MODEL_NAME, "return_token_offsets": True}
    status, rendered = post(server, "/v1/chat/completions/render", {**asked, "messages": CHAT})
    assert status == 200, rendered
    _assert_offsets(server, "<user>hi<assistant>", rendered)
    status, plain = post(server, "/v1/chat/completions/render", {"messages": CHAT})
    assert status == 200 and plain["token_offsets"] is None
    text = "one two three four"
    path = "/v1/completions/render"
    status, rendered = post(server, path, {**asked, "prompt": text})
    assert status == 200, rendered
    _assert_offsets(server, text, rendered[0])
    status, ids = post(server, path, {**asked, "prompt": [5, 6]})
    assert status == 200 and ids[0]["token_offsets"] is None
    status, cut = post(server, path, {**asked, "prompt": text, "truncate_prompt_tokens": 2})
    assert status == 200 and cut[0]["token_offsets"] == rendered[0]["token_offsets"][-2:]


def _assert_offsets(server, text, rendered):
    offsets, ids = rendered["token_offsets"], rendered["token_ids"]
    assert len(offsets) == len(ids) > 1
    for (start, end), token in zip(offsets, ids, strict=True):
        assert text[start:end].strip() == detokenized(server, [token]).strip()


def test_messages_render_matches_chat(server):
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 7, "system": "be brief"}
    status, rendered = post(server, "/v1/messages/render", body)
    assert status == 200, rendered
    assert detokenized(server, rendered["token_ids"]) == "<system>be brief<user>hi<assistant>"
    assert rendered["sampling_params"]["max_tokens"] == 7


def test_render_errors(server):
    cases = [
        ("/v1/chat/completions/render", {"model": "nope", "messages": CHAT}, 404),
        ("/v1/chat/completions/render", {"messages": []}, 400),
        ("/v1/chat/completions/render", {"messages": CHAT, "use_beam_search": True, "n": 2}, 400),
        ("/v1/completions/render", {"prompt": "x " * 300}, 400),
        ("/v1/completions/render", {"prompt": [10**9]}, 400),
        ("/v1/messages/render", {"model": MODEL_NAME, "messages": CHAT}, 400),  # no max_tokens
        ("/v1/messages/render", {"model": "nope", "messages": CHAT, "max_tokens": 1}, 404),
    ]
    for path, body, expected in cases:
        status, answer = post(server, path, body)
        assert status == expected, (path, body, answer)
        assert_error(answer)
    status, answer = post(server, "/v1/completions/render", {"prompt": "hi"}, headers={})
    assert status == 401


def test_chat_batch_answers_each_conversation(server):
    conversations = [CHAT, [{"role": "user", "content": "one two three"}]]
    body = {"model": MODEL_NAME, "max_tokens": 4, "ignore_eos": True, "request_id": "b"}
    status, answer = post(server, "/v1/chat/completions/batch", {**body, "messages": conversations})
    assert status == 200, answer
    assert answer["id"] == "chatcmpl-b" and answer["object"] == "chat.completion"
    assert [c["index"] for c in answer["choices"]] == [0, 1]
    assert all(c["finish_reason"] == "length" for c in answer["choices"])
    assert all(c["message"]["role"] == "assistant" for c in answer["choices"])
    singles = [
        post(server, "/v1/chat/completions", {**body, "messages": c})[1]["usage"]
        for c in conversations
    ]
    usage = answer["usage"]
    assert usage["prompt_tokens"] == sum(u["prompt_tokens"] for u in singles)
    assert usage["completion_tokens"] == 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + 8
    assert wait_until_idle(server.url)["pagedserve:kv_cache_usage_perc"] == 0


def test_chat_batch_errors(server):
    ok = {"model": MODEL_NAME, "messages": [CHAT]}
    cases = [
        ({**ok, "stream": True}, 400, "stream"),
        ({**ok, "n": 2}, 400, "n"),
        ({**ok, "use_beam_search": True}, 400, "use_beam_search"),
        ({**ok, "tool_choice": "auto"}, 400, "tool_choice"),
        ({**ok, "messages": []}, 400, "messages"),
        ({**ok, "messages": [CHAT, []]}, 400, "messages"),
        ({**ok, "messages": [CHAT, [{"content": "no role"}]]}, 400, "messages"),
        ({**ok, "messages": [CHAT, [{"role": "user", "content": "x " * 300}]]}, 400, "messages"),
        ({**ok, "temperature": -1}, 400, "temperature"),
        ({**ok, "model": "nope"}, 404, "model"),
    ]
    for body, expected, param in cases:
        status, answer = post(server, "/v1/chat/completions/batch", body)
        assert status == expected, (body, answer)
        assert_error(answer)
        assert answer["error"]["param"] == param, (body, answer)
    assert post(server, "/v1/chat/completions/batch", ok, headers={})[0] == 401


def test_chat_batch_reads_its_flags_as_chat_does(server):
    """stream "false", n "1" and use_beam_search "false" are what chat reads them as (off, one),
    not a refusal because the raw value was truthy."""
    flags = {"stream": "false", "n": "1", "use_beam_search": "false", "tool_choice": None}
    body = {"model": MODEL_NAME, "messages": [CHAT], "max_tokens": 2, **flags}
    assert post(server, "/v1/chat/completions", {**body, "messages": CHAT})[0] == 200
    status, answer = post(server, "/v1/chat/completions/batch", body)
    assert status == 200, answer
    assert len(answer["choices"]) == 1


LONG = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 200, "ignore_eos": True}
RESPONSE = {"model": MODEL_NAME, "input": "Hello", "max_output_tokens": 5}
POOL = ThreadPoolExecutor(4)


def chunks_of(text):
    data = [line.removeprefix("data: ") for line in text.splitlines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def chat_stream(server, body):
    """The parsed chunks of a streamed chat answer, read to the end."""
    status, text = post(server, "/v1/chat/completions", {**body, "stream": True})
    assert status == 200, text
    return chunks_of(text)


def started_stream(server, body):
    """A streamed chat answer the engine has taken (its response began); a future of its
    parsed chunks."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    headers = {**AUTH, "Content-Type": "application/json"}
    conn.request("POST", "/v1/chat/completions", json.dumps({**body, "stream": True}), headers)
    resp = conn.getresponse()
    assert resp.status == 200

    def rest():
        try:
            return chunks_of(resp.read().decode())
        finally:
            conn.close()

    return POOL.submit(rest)


def until_waiting(server, count):
    """Wait until ``count`` requests wait for the resume (they were sent from other threads)."""
    deadline = time.monotonic() + 60
    while metrics(server.url)["pagedserve:num_requests_waiting"] < count:
        assert time.monotonic() < deadline, "the requests never reached the server"
        time.sleep(0.05)


def is_paused(server):
    status, body = get(server, "/is_paused")
    assert status == 200
    return body["is_paused"]


def test_pause_keep_holds_new_requests_and_resume_loses_nothing(server):
    running = started_stream(server, {**LONG, "stream_options": {"include_usage": True}})
    assert post(server, "/pause?mode=keep", None) == (200, {"status": "paused"})
    assert is_paused(server)
    held = POOL.submit(post, server, "/v1/completions", {"prompt": "hi", "max_tokens": 3})
    until_waiting(server, 1)
    assert not held.done()
    assert post(server, "/resume", None) == (200, {"status": "resumed"})
    assert not is_paused(server)
    status, answer = held.result(timeout=60)
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
    chunks = running.result(timeout=60)
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 200
    assert wait_until_idle(server.url)["pagedserve:kv_cache_usage_perc"] == 0


def test_pause_wait_lets_requests_finish(server):
    running = started_stream(server, LONG)
    assert post(server, "/pause?mode=wait&clear_cache=false", None) == (200, {"status": "paused"})
    assert metrics(server.url)["pagedserve:num_requests_running"] == 0  # drained first
    held = POOL.submit(post, server, "/v1/chat/completions", {**LONG, "max_tokens": 2})
    finish = [c["choices"][0]["finish_reason"] for c in running.result(timeout=60)]
    assert finish[-1] == "length"
    assert not held.done()
    assert post(server, "/resume", None)[0] == 200
    status, answer = held.result(timeout=60)
    assert status == 200 and answer["choices"][0]["finish_reason"] == "length"
    assert wait_until_idle(server.url)["pagedserve:kv_cache_usage_perc"] == 0


def test_pause_abort_ends_requests_with_finish_reason_abort(server):
    running = started_stream(server, LONG)
    assert post(server, "/pause?mode=keep", None)[0] == 200
    held = POOL.submit(post, server, "/v1/chat/completions", {**LONG, "max_tokens": 5})
    held_stream = POOL.submit(chat_stream, server, {**LONG, "max_tokens": 5})
    held_response = POOL.submit(post, server, "/v1/responses", RESPONSE)
    until_waiting(server, 3)
    assert post(server, "/pause", None) == (200, {"status": "paused"})  # mode abort
    status, answer = held.result(timeout=60)
    assert status == 200, answer
    assert answer["choices"][0]["finish_reason"] == "abort"
    assert answer["choices"][0]["message"]["content"] == ""
    assert held_stream.result(timeout=60)[-1]["choices"][0]["finish_reason"] == "abort"
    status, response = held_response.result(timeout=60)
    assert status == 200 and response["status"] == "cancelled", response
    # Frozen before the abort, unless it had already finished.
    finish = [c["choices"][0]["finish_reason"] for c in running.result(timeout=60)]
    assert finish[-1] in ("abort", "length")
    assert wait_until_idle(server.url)["pagedserve:kv_cache_usage_perc"] == 0
    assert is_paused(server)
    later = POOL.submit(post, server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    assert post(server, "/resume", None)[0] == 200
    assert later.result(timeout=60)[0] == 200


def test_abort_requests_by_the_answers_id(server):
    assert post(server, "/pause?mode=keep", None)[0] == 200
    headers = {**AUTH, "X-Request-Id": "victim"}
    victim = POOL.submit(post, server, "/v1/chat/completions", LONG, headers)
    other = POOL.submit(post, server, "/v1/completions", {"prompt": "hi", "max_tokens": 2})
    until_waiting(server, 2)
    assert post(server, "/abort_requests", {"request_ids": ["nobody"]})[1]["aborted"] == 0
    body = {"request_ids": ["chatcmpl-victim"]}
    assert post(server, "/abort_requests", body) == (200, {"status": "aborted", "aborted": 1})
    status, answer = victim.result(timeout=60)
    assert status == 200 and answer["id"] == "chatcmpl-victim"
    assert answer["choices"][0]["finish_reason"] == "abort"
    assert not other.done()
    assert post(server, "/resume", None)[0] == 200
    assert other.result(timeout=60)[1]["choices"][0]["finish_reason"] == "length"
    assert post(server, "/abort_requests", {})[1] == {"status": "aborted", "aborted": 0}
    assert wait_until_idle(server.url)["pagedserve:kv_cache_usage_perc"] == 0


def test_pause_errors(server):
    for path, body in (
        ("/pause?mode=later", None),
        ("/pause?clear_cache=maybe", None),
        ("/abort_requests", [1]),
        ("/abort_requests", {"request_ids": 5}),
        ("/abort_requests", None),
    ):
        status, answer = post(server, path, body)
        assert status == 400, (path, body, answer)
        assert_error(answer)
    assert get(server, "/pause")[0] == 405
    for path in ("/pause", "/resume", "/abort_requests"):
        assert post(server, path, {}, headers={})[0] == 401
    assert get(server, "/is_paused", headers={})[0] == 401
    assert not is_paused(server)
