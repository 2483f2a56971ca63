"""Every error the server reports: its HTTP status, the OpenAI error schema, and that bad requests
neither disturb good ones nor leave KV blocks behind. The server here runs a tiny random model
(errors do not need a real one), requires an API key and has its own chat template."""

from __future__ import annotations

import asyncio
import http.client
import json
import threading

import openai
import pytest
from server_utils import MODEL_NAME, request, role_template_server, wait_until_idle

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_LIMIT = 64 * 1024
MAX_LEN = 256  # the tiny model's context length
CHAT = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    srv = role_template_server(
        tmp_path_factory,
        tiny_model_dir("llama"),
        "--max-model-len", str(MAX_LEN),
        "--kv-cache-memory", "0.25",
        "--max-request-body-bytes", str(BODY_LIMIT),
        env={"PAGEDSERVE_API_KEY": KEY},
    )  # fmt: skip
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return server.client(api_key=KEY)


def assert_error(body, param=None):
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    assert isinstance(error["type"], str)
    if param is not None:
        assert error["param"] == param


def post(server, path, body, headers=AUTH):
    return request(server.url + path, "POST", body, headers)


def test_api_key_required(server, client):
    assert client.completions.create(model=MODEL_NAME, prompt="hi", max_tokens=1).choices
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        status, body = post(server, "/v1/completions", {"prompt": "hi"}, headers)
        assert status == 401
        assert_error(body)
    status, body = request(server.url + "/v1/models")
    assert status == 401
    with pytest.raises(openai.AuthenticationError):
        server.client(api_key="wrong").models.list()


def test_chat_template_flag_overrides_the_models(server):
    status, tokenized = post(server, "/tokenize", {"messages": CHAT})
    assert status == 200
    _, text = post(server, "/detokenize", {"tokens": tokenized["tokens"]})
    assert text["prompt"] == "<user>hi<assistant>"


def test_health_and_metrics_stay_open(server):
    assert request(server.url + "/health")[0] == 200
    assert request(server.url + "/ping")[0] == 200  # SageMaker's probe carries no key
    assert request(server.url + "/invocations", "POST", {"prompt": "hi"})[0] == 401
    status, text = request(server.url + "/metrics")
    assert status == 200 and "pagedserve:num_requests_running" in text


# Output constraints and tool choices the server cannot honour are a 400, never ignored.
BAD_SCHEMA = {"name": "answer", "schema": {"type": "nonsense"}}
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
DEEP: list = []
for _ in range(600):  # deeper than transformers' walk over a template's inputs can recurse
    DEEP = [DEEP]
BAD_TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}
DEEP_SCHEMA: dict = {"type": "integer"}
for _ in range(600):  # deeper than a walk over the schema in Python can recurse
    DEEP_SCHEMA = {"type": "array", "items": DEEP_SCHEMA}


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"n": 0}, "n"),
        ({"messages": []}, "messages"),
        ({"max_tokens": MAX_LEN + 1}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"temperature": "hot"}, "temperature"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"99999999": 1.0}}, "logit_bias"),
        ({"logit_bias": {"x": 1.0}}, "logit_bias"),
        ({"stop_token_ids": [-1]}, "stop_token_ids"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages"),
        ({"messages": [{"role": "user", "content": "word " * MAX_LEN}]}, "messages"),
        ({"presence_penalty": 3}, "presence_penalty"),
        ({"n": 129}, "n"),
        ({"messages": "not a list"}, "messages"),
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"response_format": {"type": "json_schema"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": BAD_SCHEMA}},
            "response_format",
        ),
        ({"structured_outputs": {"regex": "a(("}}, "structured_outputs"),
        ({"structured_outputs": {"regex": "a", "choice": ["a"]}}, "structured_outputs"),
        ({"structured_outputs": {"grammar": "root ::= (("}}, "structured_outputs"),
        ({"structured_outputs": {"structural_tag": {"type": "x"}}}, "structured_outputs"),
        (
            {"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}},
            "structured_outputs",
        ),
        ({"tools": [TOOL]}, "tools"),
        ({"tools": [TOOL], "tool_choice": "auto"}, "tool_choice"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function"}], "tool_choice": "required"}, "tools"),
        ({"tools": [BAD_TOOL], "tool_choice": "required"}, "tools"),
        (
            {"tools": [{"function": {"name": "f", "parameters": [1]}}], "tool_choice": "required"},
            "tools",
        ),
        (
            {"tools": [{"function": {"name": "f", "parameters": "x"}}], "tool_choice": "required"},
            "tools",
        ),
        (
            {
                "tools": [TOOL],
                "tool_choice": "required",
                "response_format": {"type": "json_object"},
            },
            "tool_choice",
        ),
        (
            {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "x"}]}]},
            "messages",
        ),
        ({"use_beam_search": True, "logprobs": True}, "logprobs"),
        ({"use_beam_search": True, "tools": [TOOL], "tool_choice": "required"}, "tool_choice"),
        ({"priority": 1}, "priority"),
        ({"cache_salt": ""}, "cache_salt"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ({"truncate_prompt_tokens": MAX_LEN + 1}, "truncate_prompt_tokens"),
        ({"bad_words": [" "]}, "bad_words"),
        ({"prompt_logprobs": 21}, "prompt_logprobs"),
        ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
        ({"messages": [{"role": "user", "content": "a\ud800b"}]}, "messages"),  # lone surrogate
        ({"bad_words": ["\udc00"]}, "bad_words"),
        ({"chat_template_kwargs": {"\ud800": 1}}, "chat_template_kwargs"),  # in a key
        ({"stop": ["a", 1, "\ud800"]}, "stop"),
        ({"tools": [TOOL], "tool_choice": {"type": "function", "function": "f"}}, "tool_choice"),
        ({"tools": [TOOL], "tool_choice": {"type": "x", "function": {"name": "f"}}}, "tool_choice"),
        ({"chat_template": "{{ messages }}"}, "chat_template"),  # untrusted by default
        ({"chat_template_kwargs": {"chat_template": "{{ 1 }}"}}, "chat_template"),
        ({"chat_template_kwargs": {"deep": DEEP}}, "messages"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": DEEP_SCHEMA}}},
            "response_format",
        ),
        ({"use_beam_search": True, "n": 2, "length_penalty": float("nan")}, "length_penalty"),
        ({"seed": 2**63}, "seed"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"thinking_token_budget": 8}, "thinking_token_budget"),  # no --reasoning-parser
        ({"thinking_token_budget": -2}, "thinking_token_budget"),
        ({"thinking_token_budget": True}, "thinking_token_budget"),
        ({"repetition_detection": {"max_pattern_size": 3, "min_count": 1}}, "repetition_detection"),
        ({"repetition_detection": {"max_pattern_size": "x"}}, "repetition_detection"),
        ({"use_beam_search": True, "repetition_detection": {}}, "repetition_detection"),
    ],
)
def test_chat_bad_values_are_400(server, change, param):
    body = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 4, **change}
    status, response = post(server, "/v1/chat/completions", body)
    assert status == 400, response
    assert_error(response, param)
    assert response["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 2, 10**9]}, "prompt"),
        ({"max_tokens": 1000}, "max_tokens"),
        ({"logprobs": 25}, "logprobs"),
        ({"top_k": -5}, "top_k"),
        ({"suffix": "x"}, "suffix"),
        ({"stream": True, "n": 0}, "n"),
        (
            {"response_format": {"type": "json_schema", "json_schema": BAD_SCHEMA}},
            "response_format",
        ),
        ({"structured_outputs": {"choice": []}}, "structured_outputs"),
        ({"structured_outputs": {"json": DEEP_SCHEMA}}, "structured_outputs"),
        ({"prompt": "\ud800"}, "prompt"),
        # together they leave no token to write: bad_words bans the one allowed token
        ({"allowed_token_ids": [33662], "bad_words": ["hello"]}, None),
        # the grammar engine gives up on this regex at its first token (a limit on its lexer)
        ({"structured_outputs": {"regex": "a{1000000}"}, "temperature": 0}, None),
    ],
)
def test_completion_bad_values_are_400(server, change, param):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 4, **change}
    status, response = post(server, "/v1/completions", body)
    assert status == 400, response
    assert_error(response, param)


def test_openai_client_sees_bad_request(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL_NAME, messages=CHAT, temperature=-1)
    assert info.value.status_code == 400
    assert info.value.body["param"] == "temperature"


def test_malformed_json_is_400(server):
    deep = b"[" * 20_000  # nested past the JSON parser's recursion
    for raw in (b"{not json", b"", b"[1, 2]", b'"text"', deep):
        for path in ("/v1/chat/completions", "/invocations"):
            status, body = post(server, path, raw)
            assert status == 400, (path, raw[:20])
            assert_error(body)


def test_a_bad_query_parameter_is_named_as_the_parameter(server):
    url = f"{server.url}/v1/responses/resp_x?stream=true&starting_after=abc"
    status, body = request(url, headers=AUTH)
    assert status == 400
    assert_error(body, "starting_after")
    assert body["error"]["message"].startswith("starting_after: ")


def test_unknown_fields_are_ignored_with_a_warning(server):
    body = {"model": MODEL_NAME, "prompt": "hi", "max_tokens": 2, "max_token": 5, "best_of": 3}
    status, answer = post(server, "/v1/completions", body)
    assert status == 200 and len(answer["choices"]) == 1
    assert "request fields ignored: best_of, max_token" in server.output()


def test_unknown_model_is_404(server, client):
    status, body = post(server, "/v1/chat/completions", {"model": "nope", "messages": CHAT})
    assert status == 404
    assert_error(body, "model")
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi")


def test_embeddings_need_a_pooling_runner(server, client):
    status, body = post(server, "/v1/embeddings", {"model": MODEL_NAME, "input": "hi"})
    assert status == 400
    assert_error(body, "model")
    assert "--runner pooling" in body["error"]["message"]
    with pytest.raises(openai.BadRequestError):
        client.embeddings.create(model=MODEL_NAME, input="hi")
    status, body = post(server, "/score", {"text_1": "a", "text_2": "b"})
    assert status == 400
    assert_error(body, "model")
    status, body = post(server, "/pooling", {"input": "hi"})
    assert status == 400
    assert_error(body, "model")


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({}, "prompt"),
        ({"prompt": "hi", "messages": CHAT}, "messages"),
        ({"prompt": "\ud800"}, "prompt"),
        ({"messages": CHAT, "chat_template": "{{ messages }}"}, "chat_template"),
    ],
)
def test_tokenize_bad_values_are_400(server, body, param):
    status, response = post(server, "/tokenize", {"model": MODEL_NAME, **body})
    assert status == 400, response
    assert_error(response, param)


def test_unknown_route_is_404_in_schema(server):
    status, body = request(server.url + "/v1/nothing-here", headers=AUTH)
    assert status == 404
    assert_error(body)


def test_wrong_method_is_405_with_allow(server):
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("GET", "/v1/chat/completions", headers=AUTH)
    response = conn.getresponse()
    assert response.status == 405 and response.getheader("allow") == "POST"
    assert_error(json.loads(response.read()))
    conn.close()


def test_body_over_limit_is_413(server):
    big = {"model": MODEL_NAME, "prompt": "x" * (BODY_LIMIT + 10)}
    status, body = post(server, "/v1/completions", big)
    assert status == 413
    assert_error(body)
    # the same without a Content-Length: the size is checked as the body streams in
    host, port = server.url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    payload = json.dumps(big).encode()
    pieces = (payload[i : i + 8192] for i in range(0, len(payload), 8192))
    conn.request(
        "POST",
        "/v1/completions",
        body=pieces,
        headers={**AUTH, "Content-Type": "application/json"},
        encode_chunked=True,
    )
    resp = conn.getresponse()
    assert resp.status == 413
    assert_error(json.loads(resp.read()))
    conn.close()


def test_bad_requests_do_not_disturb_others_or_leak_blocks(server, client):
    expected = (
        client.completions.create(
            model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0
        )
        .choices[0]
        .text
    )
    results: list[str] = []

    def good() -> None:
        r = client.completions.create(
            model=MODEL_NAME, prompt="Once upon a time", max_tokens=24, temperature=0
        )
        results.append(r.choices[0].text)

    threads = [threading.Thread(target=good) for _ in range(3)]
    for t in threads:
        t.start()
    bad_bodies = [
        {"prompt": "hi", "max_tokens": MAX_LEN * 2},
        {"prompt": "hi", "temperature": -1},
        {"prompt": [0, 10**9]},
        {"prompt": "hi " * MAX_LEN},
    ]
    for _ in range(5):
        for body in bad_bodies:
            assert post(server, "/v1/completions", {"model": MODEL_NAME, **body})[0] == 400
    for t in threads:
        t.join()
    assert results == [expected] * 3
    m = wait_until_idle(server.url)
    assert m["pagedserve:num_requests_running"] == 0
    assert m["pagedserve:kv_cache_usage_perc"] == 0


def test_max_tokens_past_the_context_is_cut_to_what_the_prompt_leaves(server, client):
    """As vLLM: max_tokens up to the context length is accepted whatever the prompt, and the
    completion stops where the context ends (finish_reason length)."""
    body = {"model": MODEL_NAME, "prompt": "hi there", "max_tokens": MAX_LEN, "ignore_eos": True}
    status, answer = post(server, "/v1/completions", body)
    assert status == 200, answer
    usage = answer["usage"]
    assert usage["prompt_tokens"] + usage["completion_tokens"] == MAX_LEN
    assert answer["choices"][0]["finish_reason"] == "length"


def test_max_tokens_null_is_the_default(client):
    """As vLLM 0.32 (and OpenAI's completions): a null max_tokens is the default 16 on
    completions; on chat, the rest of the context."""
    prompt = "one two three four " * (MAX_LEN // 8)
    extra = {"ignore_eos": True}
    r = client.completions.create(
        model=MODEL_NAME, prompt=prompt, max_tokens=None, extra_body=extra
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16
    messages = [{"role": "user", "content": prompt}]
    r = client.chat.completions.create(
        model=MODEL_NAME, messages=messages, max_tokens=None, extra_body=extra
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == MAX_LEN


def test_unexpected_exception_is_a_500_that_keeps_the_connection():
    """A handler's unexpected exception is answered with a 500 in the error schema and goes no
    further: Starlette's last-resort handler re-raises after answering, and uvicorn then drops
    the connection under a client that keeps it alive for its next request."""
    from fastapi import FastAPI

    from pagedserve.entrypoints.openai.errors import install_error_handlers
    from pagedserve.entrypoints.openai.middleware import InternalErrorMiddleware

    app = FastAPI()
    install_error_handlers(app)
    app.add_middleware(InternalErrorMiddleware)

    @app.post("/boom")
    async def boom() -> None:
        raise ZeroDivisionError("x")

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/boom", "headers": [], "query_string": b""}
    asyncio.run(app(scope, receive, send))  # raises if the exception goes on up
    assert sent[0]["status"] == 500
    body = json.loads(b"".join(m.get("body", b"") for m in sent[1:]))
    assert_error(body)
    assert body["error"]["type"] == "server_error"
