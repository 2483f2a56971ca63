"""tool_choice "auto" on a server started with vLLM's ``--enable-auto-tool-choice
--tool-call-parser``: the model's own tool-call text comes back as OpenAI tool calls.

A tiny random model writes no tool calls of its own accord, so each request holds its answer
to a regex (vLLM's ``structured_outputs`` extra): the text a Hermes-format model would write.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from server_utils import MODEL_NAME, REPO, ServerProcess, wait_until_idle

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}
CALL_TEXT = (
    'Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
    "</tool_call>"
)


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    args = [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME]
    args += ["--kv-cache-memory", "0.05", "--enable-auto-tool-choice"]
    srv = ServerProcess([*args, "--tool-call-parser", "hermes"]).wait_ready()
    yield srv
    srv.close()


def chat(server, answer: str, **kwargs):
    return server.client().chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[WEATHER],
        max_tokens=120,
        extra_body={"structured_outputs": {"regex": re.escape(answer)}},
        **kwargs,
    )


def test_the_calls_the_model_writes_come_back_as_tool_calls(server):
    r = chat(server, CALL_TEXT)
    (choice,) = r.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check.\n"
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("chatcmpl-tool-")
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}

    content, calls, finish = "", {}, None
    for chunk in chat(server, CALL_TEXT, stream=True):
        delta = chunk.choices[0].delta
        content += delta.content or ""
        for d in delta.tool_calls or []:
            calls[d.index] = (d.id, d.function.name, d.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert (content, finish) == ("Let me check.\n", "tool_calls")
    ((call_id, name, arguments),) = calls.values()
    assert call_id.startswith("chatcmpl-tool-") and name == "get_weather"
    assert arguments == call.function.arguments
    wait_until_idle(server.url)


def test_parallel_tool_calls_false_keeps_the_first_call(server):
    """As vLLM answers it: of the calls an ``auto`` answer writes, only the first comes back
    (whole or streamed); by default all of them do."""
    second = '\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    both = CALL_TEXT + second
    calls = chat(server, both).choices[0].message.tool_calls
    assert [json.loads(c.function.arguments)["city"] for c in calls] == ["Paris", "Rome"]
    r = chat(server, both, parallel_tool_calls=False)
    (call,) = r.choices[0].message.tool_calls
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    assert r.choices[0].finish_reason == "tool_calls"
    streamed = {}
    for chunk in chat(server, both, stream=True, parallel_tool_calls=False):
        for d in chunk.choices[0].delta.tool_calls or []:
            streamed[d.index] = json.loads(d.function.arguments)
    assert streamed == {0: {"city": "Paris"}}


def test_an_answer_without_calls_stays_text(server):
    r = chat(server, "It is sunny <in> Paris.")
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "It is sunny <in> Paris."
    assert not r.choices[0].message.tool_calls
    streamed = "".join(
        c.choices[0].delta.content or "" for c in chat(server, "Sunny.", stream=True)
    )
    assert streamed == "Sunny."


def test_auto_tool_choice_needs_a_parser():
    proc = subprocess.run(
        [sys.executable, "-m", "pagedserve", "serve", "--enable-auto-tool-choice"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert "--enable-auto-tool-choice needs --tool-call-parser" in proc.stderr


@pytest.mark.parametrize(
    ("parser", "text"),
    [
        (
            "mistral",
            'Let me check. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}]',
        ),
        ("pythonic", '[get_weather(city="Paris")]'),
    ],
)
def test_the_other_parsers_on_a_server(parser, text, tiny_model_dir):
    """Mistral's calls get nine-character ids (its templates refuse others), in the chat
    completion and in the Responses API."""
    args = [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME]
    args += ["--kv-cache-memory", "0.05", "--enable-auto-tool-choice", "--tool-call-parser", parser]
    server = ServerProcess(args).wait_ready()
    try:
        (choice,) = chat(server, text).choices
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert (call.function.name, json.loads(call.function.arguments)) == (
            "get_weather",
            {"city": "Paris"},
        )
        if parser == "mistral":
            assert choice.message.content == "Let me check. "
            assert len(call.id) == 9 and call.id.isalnum()
        response = server.client().responses.create(
            model=MODEL_NAME,
            input="What is the weather in Paris?",
            tools=[{"type": "function", **WEATHER["function"]}],
            max_output_tokens=120,
            extra_body={"structured_outputs": {"regex": re.escape(text)}},
        )
        (item,) = [i for i in response.output if i.type == "function_call"]
        assert item.name == "get_weather" and json.loads(item.arguments) == {"city": "Paris"}
        assert len(item.call_id) == 9 if parser == "mistral" else item.call_id.startswith("call_")
    finally:
        server.close()
