"""``--reasoning-parser`` granite on a running server, alone and beside its family's
``--tool-call-parser``: the thinking reaches the openai client as ``reasoning_content`` (and the
Responses API's reasoning item), the answer as ``content`` or ``tool_calls``, whole and streamed
alike.

A tiny random model thinks nothing of its own accord, so a constraint holds each answer to the
text its model family writes."""

from __future__ import annotations

import json
import re

import pytest
from server_utils import MODEL_NAME, ServerProcess, wait_until_idle

CHAT = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
THOUGHT, RESPONSE = "Here is my thought process:", "Here is my response:"


def serve(model: str, *flags: str) -> ServerProcess:
    args = [model, "--served-model-name", MODEL_NAME, "--kv-cache-memory", "0.05", *flags]
    return ServerProcess(args).wait_ready()


def ask(server: ServerProcess, constraint: dict, **kwargs):
    """The whole answer, and the streamed one's (reasoning, content, calls)."""
    args = {"model": MODEL_NAME, "messages": CHAT, "max_tokens": 80, "temperature": 0}
    args.update(kwargs, extra_body={"structured_outputs": constraint})
    client = server.client()
    whole = client.chat.completions.create(**args)
    reasoning, content, calls = "", "", []
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            reasoning += choice.delta.model_extra.get("reasoning_content") or ""
            content += choice.delta.content or ""
            calls += [
                (c.function.name, c.function.arguments) for c in choice.delta.tool_calls or []
            ]
    return whole, (reasoning, content or None, calls)


def calls_of(message) -> list[tuple[str, str]]:
    return [(c.function.name, c.function.arguments) for c in message.tool_calls or []]


@pytest.mark.parametrize(
    ("parser", "regex"),
    [
        ("granite", f"{THOUGHT}[a-z ]{{3,30}}{RESPONSE}[A-Za-z ]{{3,30}}"),
        ("granite", f"Here's my thought process:[a-z ]{{3,30}}{RESPONSE}[A-Za-z ]{{3,30}}"),
    ],
)
def test_text_markers_split_thinking_from_the_answer(parser, regex, tiny_model_dir):
    server = serve(tiny_model_dir("llama"), "--reasoning-parser", parser)
    try:
        whole, streamed = ask(server, {"regex": regex})
        choice = whole.choices[0]
        message = choice.message
        reasoning = message.model_extra["reasoning_content"]
        assert reasoning and message.content and choice.finish_reason == "stop"
        assert message.model_extra["reasoning"] == reasoning
        assert not any(marker in reasoning + message.content for marker in ("Here", "think>"))
        assert streamed == (reasoning, message.content, [])
        r = server.client().responses.create(
            model=MODEL_NAME,
            input=CHAT[0]["content"],
            max_output_tokens=80,
            temperature=0,
            extra_body={"structured_outputs": {"regex": regex}},
        )
        assert [item.type for item in r.output] == ["reasoning", "message"]
        assert r.output[0].content[0].text == reasoning and r.output_text == message.content
        wait_until_idle(server.url)
    finally:
        server.close()


def test_granite_thinks_then_calls_a_tool(tiny_model_dir):
    """Granite 3.2 thinks, then its response is a call: reasoning and tool_calls together."""
    flags = ["--reasoning-parser", "granite", "--enable-auto-tool-choice"]
    server = serve(tiny_model_dir("llama"), *flags, "--tool-call-parser", "granite")
    try:
        text = f"{THOUGHT} ask for it {RESPONSE}<|tool_call|>{CALL}"
        whole, streamed = ask(server, {"regex": re.escape(text)}, tools=[WEATHER])
        choice = whole.choices[0]
        message = choice.message
        assert choice.finish_reason == "tool_calls"
        assert message.model_extra["reasoning_content"] == " ask for it "
        assert message.content is None
        (call,) = calls_of(message)
        assert call[0] == "get_weather" and json.loads(call[1]) == {"city": "Paris"}
        assert streamed == (" ask for it ", None, [call])
    finally:
        server.close()
