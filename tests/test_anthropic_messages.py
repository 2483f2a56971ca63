"""Anthropic's Messages API (``/v1/messages``, ``/v1/messages/count_tokens``), end to end: a real
``pagedserve serve`` process on a tiny random model, driven by the official ``anthropic``
client, its answers compared with the chat path's.

A random model writes no tool calls or thinking of its own accord, so those requests hold the
answer to a regex (vLLM's ``structured_outputs`` extra, which the Messages API takes too): the
text a Hermes-format reasoning model would write.
"""

from __future__ import annotations

import itertools
import json
import re
import urllib.request

import anthropic
import pytest
from server_utils import MODEL_NAME, ServerProcess, request

KEY = "sk-test-key"
BODY_LIMIT = 64 * 1024
MAX_LEN = 256  # the tiny model's context
QUESTION = [{"role": "user", "content": "Name three colours."}]
WEATHER = {
    "name": "get_weather",
    "description": "The weather in a city.",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"enum": ["Paris", "Rome"]}},
        "required": ["city"],
        # llguidance's option: compact JSON. Left free, a random model held to a tool's schema
        # writes whitespace until max_tokens.
        "x-guidance": {"whitespace_flexible": False},
    },
}
CHAT_WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": WEATHER["description"],
        "parameters": WEATHER["input_schema"],
    },
}
CALL_TEXT = (
    'Hm.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
)
THINKING_TEXT = "<think>colours</think>Red."
RAW_EVENTS = {"message_start", "content_block_start", "content_block_delta",
              "content_block_stop", "message_delta", "message_stop"}  # fmt: skip


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME, "--api-key", KEY]
    args += ["--kv-cache-memory", "0.05", "--max-request-body-bytes", str(BODY_LIMIT)]
    args += ["--enable-auto-tool-choice", "--tool-call-parser", "hermes"]
    srv = ServerProcess([*args, "--reasoning-parser", "qwen3"]).wait_ready()
    yield srv
    srv.close()


@pytest.fixture(scope="module")
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0)


def args(kwargs: dict) -> dict:
    """A greedy request for QUESTION (``kwargs`` override). This client sends no
    ``temperature`` or ``top_k`` (Anthropic's newer models take none): they go in
    ``extra_body``, as vLLM's extras do."""
    extra = {"temperature": 0, **kwargs.pop("extra_body", {})}
    return {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 12, **kwargs,
            "extra_body": extra}  # fmt: skip


def message(client, **kwargs):
    return client.messages.create(**args(kwargs))


def streamed(client, **kwargs):
    """(the stream's events, the message the client puts together from them)."""
    with client.messages.stream(**args(kwargs)) as stream:
        events = [e for e in stream if e.type in RAW_EVENTS]
        return events, stream.get_final_message()


def forced(text: str) -> dict:
    """``extra_body`` that holds the answer to ``text``."""
    return {"structured_outputs": {"regex": re.escape(text)}}


def chat(server, **kwargs):
    args = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    return server.client(api_key=KEY).chat.completions.create(**{**args, **kwargs})


def post(server, path, body, headers=None):
    return request(server.url + path, "POST", body, headers or {"x-api-key": KEY})


def dump(msg) -> dict:
    """A message without its id, usage (the prefix cache moves tokens between the counts) and
    the thinking blocks' (random) signatures."""
    body = msg.model_dump(exclude_none=True, exclude={"id", "usage"})
    for block in body["content"]:
        block.pop("signature", None)
    return body


def collapsed(kinds) -> list[str]:
    """Event types with each run of one type as one."""
    return [kind for kind, _ in itertools.groupby(kinds)]


def prompt_tokens(msg) -> int:
    return msg.usage.input_tokens + msg.usage.cache_read_input_tokens


def sse_frames(server, body) -> list[tuple[str, dict]]:
    """A streamed answer's bytes as (``event:`` line, ``data:`` line parsed) pairs."""
    req = urllib.request.Request(
        server.url + "/v1/messages",
        json.dumps({**body, "stream": True}).encode(),
        {"Content-Type": "application/json", "x-api-key": KEY},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = resp.read().decode()
    frames = []
    for frame in text.removesuffix("\n\n").split("\n\n"):
        event_line, data_line = frame.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        frames.append((event_line[7:], json.loads(data_line[6:])))
    return frames


def test_a_message_answers_as_chat_does(server, client):
    m = message(client, metadata={"user_id": "u-1"}, extra_body={"top_k": 5})
    c = chat(server, extra_body={"top_k": 5})
    assert m.id.startswith("msg_") and m.type == "message" and m.role == "assistant"
    assert m.model == MODEL_NAME
    text = c.choices[0].message.content
    assert [b.model_dump(exclude_none=True) for b in m.content] == [{"type": "text", "text": text}]
    stop = {"length": "max_tokens", "stop": "end_turn"}[c.choices[0].finish_reason]
    assert (m.stop_reason, m.stop_sequence) == (stop, None)
    assert prompt_tokens(m) == c.usage.prompt_tokens
    assert m.usage.output_tokens == c.usage.completion_tokens
    assert m.usage.cache_creation_input_tokens == 0
    assert m.usage.output_tokens_details.thinking_tokens == 0
    count = client.messages.count_tokens(model=MODEL_NAME, messages=QUESTION)
    assert count.input_tokens == c.usage.prompt_tokens


def test_system_as_text_or_blocks_and_a_prefill(server, client):
    system = [{"type": "text", "text": "Be brief."}, {"type": "text", "text": "Use English."}]
    as_blocks = message(client, system=system)
    as_text = message(client, system="Be brief.\nUse English.")
    assert dump(as_blocks) == dump(as_text)
    conversation = [{"role": "system", "content": "Be brief.\nUse English."}, *QUESTION]
    assert as_text.content[0].text == chat(server, messages=conversation).choices[0].message.content
    # A conversation that ends with the assistant's text: the answer continues it.
    prefill = [*QUESTION, {"role": "assistant", "content": "Red,"}]
    continued = chat(
        server,
        messages=prefill,
        extra_body={"add_generation_prompt": False, "continue_final_message": True},
    )
    m = message(client, messages=prefill)
    assert m.content[0].text == continued.choices[0].message.content
    assert prompt_tokens(m) == continued.usage.prompt_tokens


def test_the_stream_writes_anthropics_events_in_order(server, client):
    body = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 12, "temperature": 0}
    frames = sse_frames(server, body)
    assert all(kind == data["type"] for kind, data in frames)
    kinds = [kind for kind, _ in frames]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert set(kinds[3:-3]) == {"content_block_delta"}
    start = frames[0][1]["message"]
    assert start["id"].startswith("msg_") and start["model"] == MODEL_NAME
    assert (start["content"], start["stop_reason"], start["usage"]["input_tokens"] > 0) == (
        [], None, True)  # fmt: skip
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    assert frames[2][1] == block
    deltas = [data["delta"] for kind, data in frames if kind == "content_block_delta"]
    assert {d["type"] for d in deltas} == {"text_delta"}
    whole = message(client)
    assert "".join(d["text"] for d in deltas) == whole.content[0].text
    end = frames[-2][1]
    assert end["delta"] == {"stop_reason": whole.stop_reason, "stop_sequence": None}
    assert end["usage"]["output_tokens"] == whole.usage.output_tokens
    events, assembled = streamed(client)
    # The client skips pings; the deltas are as many as the engine's outputs were.
    assert collapsed(e.type for e in events) == collapsed(k for k in kinds if k != "ping")
    assert dump(assembled) == dump(whole)
    assert prompt_tokens(assembled) == prompt_tokens(whole)


def test_a_named_tool_is_a_tool_use_block(client):
    named = {"type": "tool", "name": "get_weather"}
    m = message(client, tools=[WEATHER], tool_choice=named, max_tokens=30)
    (block,) = m.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "get_weather" and block.input["city"] in ("Paris", "Rome")
    assert m.stop_reason == "tool_use"
    events, assembled = streamed(client, tools=[WEATHER], tool_choice=named, max_tokens=30)
    deltas = {e.delta.type for e in events if e.type == "content_block_delta"}
    assert deltas == {"input_json_delta"}
    (streamed_block,) = assembled.content
    assert streamed_block.id.startswith("toolu_") and streamed_block.id != block.id
    assert (streamed_block.name, streamed_block.input) == (block.name, block.input)
    assert assembled.stop_reason == "tool_use"


def test_any_tool_holds_the_answer_to_a_list_of_calls(client):
    """``any`` is chat's ``required``: a JSON list of calls. The random model fills it with
    whitespace (the x-guidance option holds only at a schema's top), so max_tokens cuts it:
    it stays text, not a call to run, whole and streamed."""
    m = message(client, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=8)
    (block,) = m.content
    assert block.type == "text" and block.text.startswith("[")
    assert m.stop_reason == "max_tokens"
    _, assembled = streamed(client, tools=[WEATHER], tool_choice={"type": "any"}, max_tokens=8)
    assert dump(assembled) == dump(m)


def test_the_calls_the_model_writes_come_back_as_tool_use(server, client):
    """tool_choice auto, with the server's Hermes parser; the stream writes the same blocks."""
    m = message(client, tools=[WEATHER], max_tokens=60, extra_body=forced(CALL_TEXT))
    text, call = m.content
    assert text.type == "text" and text.text == "Hm.\n"
    assert call.type == "tool_use" and (call.name, call.input) == ("get_weather", {"city": "Paris"})
    assert m.stop_reason == "tool_use"
    events, assembled = streamed(
        client, tools=[WEATHER], max_tokens=60, extra_body=forced(CALL_TEXT)
    )
    starts = [e.content_block.type for e in events if e.type == "content_block_start"]
    assert starts == ["text", "tool_use"]
    assert dump(assembled)["content"][1] | {"id": call.id} == call.model_dump(exclude_none=True)
    assert assembled.stop_reason == "tool_use"
    # The call and its result go back into the prompt as chat's tool_calls and tool message.
    turn = [
        *QUESTION,
        {"role": "assistant", "content": [
            {"type": "text", "text": "Hm."},
            {"type": "tool_use", "id": call.id, "name": "get_weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": call.id,
             "content": [{"type": "text", "text": "Sunny"}]},
            {"type": "text", "text": "And now?"},
        ]},
    ]  # fmt: skip
    chat_turn = [
        *QUESTION,
        {"role": "assistant", "content": "Hm.", "tool_calls": [
            {"id": call.id, "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}},
        ]},
        {"role": "tool", "tool_call_id": call.id, "content": "Sunny"},
        {"role": "user", "content": "And now?"},
    ]  # fmt: skip
    count = client.messages.count_tokens(model=MODEL_NAME, messages=turn, tools=[WEATHER])
    answer = message(client, messages=turn, tools=[WEATHER], tool_choice={"type": "none"})
    expected = chat(server, messages=chat_turn, tools=[CHAT_WEATHER], tool_choice="none")
    assert count.input_tokens == prompt_tokens(answer) == expected.usage.prompt_tokens
    assert answer.content[0].text == expected.choices[0].message.content


def test_thinking_comes_back_as_a_thinking_block(server, client):
    m = message(client, max_tokens=30, extra_body=forced(THINKING_TEXT))
    thinking, text = m.content
    assert thinking.type == "thinking" and thinking.thinking == "colours" and thinking.signature
    assert text.text == "Red." and m.stop_reason == "end_turn"
    c = chat(server, max_tokens=30, extra_body=forced(THINKING_TEXT))
    assert c.choices[0].message.model_extra["reasoning_content"] == "colours"
    reasoning_tokens = c.usage.completion_tokens_details.reasoning_tokens
    assert m.usage.output_tokens_details.thinking_tokens == reasoning_tokens > 0
    assert m.usage.output_tokens == c.usage.completion_tokens
    events, assembled = streamed(client, max_tokens=30, extra_body=forced(THINKING_TEXT))
    deltas = [e.delta.type for e in events if e.type == "content_block_delta"]
    assert deltas[0] == "thinking_delta" and deltas[-1] == "text_delta"
    assert deltas.index("signature_delta") == deltas.index("text_delta") - 1
    assert dump(assembled) == dump(m) and assembled.content[0].signature
    # thinking enabled (its budget at least Anthropic's 1024, below max_tokens), not shown
    thinking = {"type": "enabled", "budget_tokens": 1024, "display": "omitted"}
    hidden = message(client, max_tokens=2000, thinking=thinking, extra_body=forced(THINKING_TEXT))
    assert hidden.content[0].thinking == "" and hidden.content[1].text == "Red."


def test_stop_sequences_max_tokens_and_the_context(client):
    m = message(client, max_tokens=40, stop_sequences=["world"], extra_body=forced("Hi world!"))
    assert m.content[0].text == "Hi " and m.stop_reason == "stop_sequence"
    assert m.stop_sequence == "world"
    m = message(client, max_tokens=2, extra_body=forced("Hi world!"))
    assert m.stop_reason == "max_tokens" and m.usage.output_tokens == 2
    # Anthropic's clients ask for more than a small model's context holds: not refused, cut
    # where the context ends. (The client streams a max_tokens this large.)
    long = {"system": "Be brief. " * 70, "max_tokens": 64000}  # 210 of the 256 tokens
    _, m = streamed(client, **long, extra_body={"structured_outputs": {"regex": "[a-z]+"}})
    assert m.stop_reason == "model_context_window_exceeded"
    assert prompt_tokens(m) + m.usage.output_tokens == MAX_LEN


def assert_error(status, body, expected_status, expected_type):
    assert status == expected_status, body
    assert body["type"] == "error" and set(body) == {"type", "error"}
    assert body["error"]["type"] == expected_type and body["error"]["message"]


def test_errors_are_in_anthropics_schema(server, client):
    with pytest.raises(anthropic.NotFoundError) as caught:
        message(client, model="claude-not-served")
    assert caught.value.body["error"]["type"] == "not_found_error"
    good = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 4}
    assert_error(*post(server, "/v1/messages", {**good, "model": "nope"}), 404, "not_found_error")
    count = {"model": "nope", "messages": QUESTION}
    assert_error(*post(server, "/v1/messages/count_tokens", count), 404, "not_found_error")
    status, body = post(server, "/v1/messages", {"model": MODEL_NAME, "messages": QUESTION})
    assert_error(status, body, 400, "invalid_request_error")
    assert body["error"]["message"] == "max_tokens: Field required"
    for bad in (
        {"max_tokens": 0},
        {"messages": [{"role": "tool", "content": "hi"}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}]},
        {"messages": [{"role": "assistant", "content": [{"type": "tool_result"}]}]},
        {"messages": []},
        {"tools": [{"type": "web_search_20250305", "name": "web_search"}]},
        {"tool_choice": {"type": "tool", "name": "nope"}, "tools": [WEATHER]},
        {"thinking": {"type": "enabled", "budget_tokens": 100}},
        {"stream": True, "temperature": -1},
        {"system": "x" * 2000},  # more than the context
    ):
        status, body = post(server, "/v1/messages", {**good, **bad})
        assert_error(status, body, 400, "invalid_request_error")
    status, body = request(server.url + "/v1/messages", "GET", headers={"x-api-key": KEY})
    assert_error(status, body, 405, "invalid_request_error")
    huge = {**good, "system": "x" * BODY_LIMIT}
    assert_error(*post(server, "/v1/messages", huge), 413, "request_too_large")
    # count_tokens counts a prompt longer than the context (so a client learns to shorten it).
    status, body = post(server, "/v1/messages/count_tokens", {**count, "model": MODEL_NAME,
                                                              "system": "Be brief. " * 300})  # fmt: skip
    assert status == 200 and body["input_tokens"] > MAX_LEN
    # The OpenAI routes keep OpenAI's schema.
    status, body = post(server, "/v1/chat/completions", {**good, "model": "nope"})
    assert status == 404 and set(body) == {"error"} and body["error"]["code"] == "model_not_found"


def test_the_api_key_as_anthropics_clients_send_it(server, client):
    good = {"model": MODEL_NAME, "messages": QUESTION, "max_tokens": 2}
    for headers in ({"x-api-key": KEY}, {"Authorization": f"Bearer {KEY}"}):
        status, body = post(server, "/v1/messages", good, headers)
        assert status == 200 and body["type"] == "message"
    for headers in ({"x-api-key": "wrong"}, {"Authorization": KEY}, {"Accept": "*/*"}):
        assert_error(*post(server, "/v1/messages", good, headers), 401, "authentication_error")
    assert request(server.url + "/v1/models", headers={"x-api-key": KEY})[0] == 200
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError):
        message(wrong)
