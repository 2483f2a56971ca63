"""The newer ``--tool-call-parser`` formats on a running server: the calls a model writes in
its own format reach the openai client as ``tool_calls``, whole and streamed.

A tiny random model writes no calls of its own accord, so each request holds its answer to a
regex (as in test_server_tool_choice_auto.py): the text the model family would write.
"""

from __future__ import annotations

import json
import re

import pytest
from server_utils import MODEL_NAME, ServerProcess, wait_until_idle

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        },
    },
}

ANSWERS = {
    "phi4_mini_json": (
        'Let me check. functools[{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}]'
    ),
    "granite": (
        'Let me check. <|tool_call|>[{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}]'
    ),
    "granite-20b-fc": (
        'Let me check. <function_call> {"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}'
    ),
    "llama4_pythonic": '<|python_start|>[get_weather(city="Paris", days=2)]<|python_end|>',
    "olmo3": 'Let me check. <function_calls>\nget_weather(city="Paris", days=2)\n</function_calls>',
    "granite4": (
        'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}</tool_call>'
    ),
    "xlam": (
        'Let me check. ```json\n[{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}]\n```'
    ),
    "functiongemma": (
        "Let me check. <start_function_call>call:get_weather{city:<escape>Paris<escape>,"
        "days:<escape>2<escape>}<end_function_call>"
    ),
    "deepseek_v3": (
        "Let me check. <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather\n"
        '```json\n{"city": "Paris", "days": 2}\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>'
    ),
    "qwen3_coder": (
        "Let me check. <tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n"
        "</parameter>\n<parameter=days>\n2\n</parameter>\n</function>\n</tool_call>"
    ),
}

CONTENT = {"llama4_pythonic": None}  # its calls are the whole answer (text before: no calls)


@pytest.mark.parametrize("parser", sorted(ANSWERS))
def test_the_model_s_calls_reach_the_client(parser, tiny_model_dir):
    args = [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME, "--kv-cache-memory"]
    args += ["0.05", "--enable-auto-tool-choice", "--tool-call-parser", parser]
    server = ServerProcess(args).wait_ready()
    try:
        request = {
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
            "tools": [WEATHER],
            "max_tokens": 150,
            "extra_body": {"structured_outputs": {"regex": re.escape(ANSWERS[parser])}},
        }
        (choice,) = server.client().chat.completions.create(**request).choices
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content == CONTENT.get(parser, "Let me check. ")
        (call,) = choice.message.tool_calls
        assert call.type == "function" and call.function.name == "get_weather"
        assert json.loads(call.function.arguments) == {"city": "Paris", "days": 2}

        content, calls, finish = "", [], None
        for chunk in server.client().chat.completions.create(**request, stream=True):
            delta = chunk.choices[0].delta
            content += delta.content or ""
            calls += [(d.function.name, d.function.arguments) for d in delta.tool_calls or []]
            finish = chunk.choices[0].finish_reason or finish
        assert (content or None, finish) == (CONTENT.get(parser, "Let me check. "), "tool_calls")
        assert calls == [("get_weather", call.function.arguments)]
        wait_until_idle(server.url)
    finally:
        server.close()
