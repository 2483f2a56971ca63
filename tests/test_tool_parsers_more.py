"""The tool-call parsers of Phi-4-mini, xLAM, FunctionGemma and Qwen3-Coder (tool_choice
"auto"): whole answers, and streams cut at every character giving the same answer."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas, final_answer
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS


def _ids():
    counter = itertools.count()
    return lambda: f"call-{next(counter)}"


def answer(text: str, parser: str, tools: list[dict[str, Any]] | None = None):
    """``(content, [(name, arguments)], finish_reason)`` of a whole answer."""
    message, finish = final_answer(text, (AUTO, parser), "stop", _ids(), tools)
    return message["content"], names_and_arguments(message.get("tool_calls", [])), finish


def streamed(text: str, parser: str, tools: list[dict[str, Any]] | None = None):
    """The same, streamed one character at a time."""
    deltas = ToolCallDeltas((AUTO, parser), _ids(), tools)
    content, calls, finish = "", [], None
    for end in range(1, len(text) + 1):
        delta, finish = deltas.next("", text[:end], "stop" if end == len(text) else None)
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            assert call["index"] == len(calls)
            calls.append(call)
    return content or None, names_and_arguments(calls), finish


def names_and_arguments(calls) -> list[tuple[str, Any]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def assert_contract(text: str, parser: str, tools: list[dict[str, Any]] | None = None) -> None:
    """Cut at every character, the parser's content and calls only grow, and end as the
    whole answer's."""
    parse = TOOL_PARSERS[parser](tools)
    content, calls = "", []
    for end in range(len(text) + 1):
        now_content, now_calls = parse.split(text[:end], end == len(text))
        assert now_content.startswith(content) and now_calls[: len(calls)] == calls, text[:end]
        content, calls = now_content, now_calls
    assert (content, calls) == TOOL_PARSERS[parser](tools).split(text, True)


def assert_read(text: str, parser: str, content, calls, tools=None) -> None:
    assert_contract(text, parser, tools)
    finish = "tool_calls" if calls else "stop"
    assert answer(text, parser, tools) == (content, calls, finish)
    assert streamed(text, parser, tools) == (content, calls, finish)


PARIS = ("get_weather", {"city": "Paris"})
TIME = ("get_time", {})


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            'functools[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
            '{"name": "get_time", "parameters": {}}]',
            None,
            [PARIS, TIME],
        ),
        (
            'Sure. functools[{"name": "get_weather", "arguments": {"city": "Paris"}}]',
            "Sure. ",
            [PARIS],
        ),
        (  # a list in the arguments (vLLM's reading stops at its "]")
            'functools[{"name": "get_weather", "arguments": {"days": [1, 2]}}]',
            None,
            [("get_weather", {"days": [1, 2]})],
        ),
    ],
)
def test_phi4_mini_json_reads_its_calls(text, content, calls):
    assert_read(text, "phi4_mini_json", content, calls)


@pytest.mark.parametrize(
    "text",
    [
        "import functools\nfunctools.reduce(add, xs)",
        'functools[{"name": "get_weather"}]',  # neither arguments nor parameters
        'functools[{"name": "get_weather", "arguments": {"city": ',  # cut short
        "functools[]",
    ],
)
def test_phi4_mini_json_without_whole_calls_is_content(text):
    assert_read(text, "phi4_mini_json", text, [])


def test_phi4_mini_json_holds_back_what_may_start_a_call_then_releases_it():
    deltas = ToolCallDeltas((AUTO, "phi4_mini_json"), _ids())
    assert deltas.next("", "Use functools", None) == ({"content": "Use "}, None)
    assert deltas.next("", "Use functools.", None) == ({"content": "functools."}, None)


XLAM_CALLS = (
    '[{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]'
)


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (XLAM_CALLS, None, [PARIS, TIME]),
        (f"\n{XLAM_CALLS}\n", None, [PARIS, TIME]),
        (f"Here:\n```json\n{XLAM_CALLS}\n```\nDone.", "Here:\n\nDone.", [PARIS, TIME]),
        (f"```\n{XLAM_CALLS}```", None, [PARIS, TIME]),
        (f"<think>Two calls.</think>\n{XLAM_CALLS}", "<think>Two calls.</think>\n", [PARIS, TIME]),
        (f"Checking. [TOOL_CALLS] {XLAM_CALLS}\nMore.", "Checking. \nMore.", [PARIS, TIME]),
        (f"<tool_call>{XLAM_CALLS}</tool_call>", None, [PARIS, TIME]),
        (  # arguments as a JSON text; items that are no call are left out, as in vLLM
            '[{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}, {"x": 1}]',
            None,
            [PARIS],
        ),
        (  # a code block first is content, and the search goes on
            f"```python\nprint([1])\n```\n```json\n{XLAM_CALLS}\n```",
            "```python\nprint([1])\n```\n",
            [PARIS, TIME],
        ),
    ],
)
def test_xlam_reads_each_of_its_formats(text, content, calls):
    assert_read(text, "xlam", content, calls)


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Paris.",
        "[1, 2, 3]",
        "Plain [link](https://example.com) text",
        "```python\nprint([1])\n```",
        '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>',  # one object, no list
        '[{"name": "get_weather", "arguments": {"city": ',  # cut short
        f"```json\n{XLAM_CALLS}",  # the fence never closes
    ],
)
def test_xlam_without_a_list_of_calls_is_content(text):
    assert_read(text, "xlam", text, [])


def test_xlam_holds_back_what_may_start_a_call_then_releases_it():
    deltas = ToolCallDeltas((AUTO, "xlam"), _ids())
    assert deltas.next("", "Look ``", None) == ({"content": "Look "}, None)
    assert deltas.next("", "Look ```js", None) == ({}, None)
    assert deltas.next("", "Look ```jsx", None) == ({"content": "```jsx"}, None)
    assert deltas.next("", "Look ```jsx [TOOL_", None) == ({"content": " "}, None)
    assert deltas.next("", "Look ```jsx [TOOL_CALLS] no", None) == (
        {"content": "[TOOL_CALLS] no"},
        None,
    )


def _gemma_call(name: str, body: str) -> str:
    return f"<start_function_call>call:{name}{{{body}}}<end_function_call>"


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (
            _gemma_call("get_weather", "city:<escape>Paris<escape>,days:<escape>2<escape>")
            + _gemma_call("get_time", ""),
            None,
            [("get_weather", {"city": "Paris", "days": 2}), TIME],
        ),
        (  # braces and commas inside <escape> are text
            "Sure. " + _gemma_call("get_weather", "city:<escape>Paris, {France}<escape>"),
            "Sure. ",
            [("get_weather", {"city": "Paris, {France}"})],
        ),
        (  # values that are JSON are read as JSON, as in vLLM
            _gemma_call("get_weather", "days:<escape>[1, 2]<escape>,metric:<escape>true<escape>"),
            None,
            [("get_weather", {"days": [1, 2], "metric": True})],
        ),
        (  # the answer ended inside its last call
            "<start_function_call>call:get_weather{city:<escape>Paris<escape>",
            None,
            [PARIS],
        ),
    ],
)
def test_functiongemma_reads_its_calls(text, content, calls):
    assert_read(text, "functiongemma", content, calls)


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny {in} Paris: call:me",
        "<start_function_call>not a call<end_function_call>",
        "Hello <start_function",
    ],
)
def test_functiongemma_without_calls_is_content(text):
    assert_read(text, "functiongemma", text, [])


def test_functiongemma_holds_back_a_partial_marker_and_keeps_special_tokens():
    deltas = ToolCallDeltas((AUTO, "functiongemma"), _ids())
    assert deltas.next("", "Hi <start_fun", None) == ({"content": "Hi "}, None)
    assert deltas.next("", "Hi <start_fun>", None) == ({"content": "<start_fun>"}, None)
    special = {"<start_function_call>", "<end_function_call>", "<escape>"}
    assert TOOL_PARSERS["functiongemma"].special_tokens == special


QWEN_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string"},
                    "days": {"type": "integer"},
                    "metric": {"type": "boolean"},
                    "scale": {"type": ["number", "null"]},
                    "tags": {"type": "array"},
                    "unit": {"enum": ["c", "f"]},
                },
            },
        },
    }
]


def _qwen_call(name: str, **parameters: str) -> str:
    body = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in parameters.items())
    return f"<tool_call>\n<function={name}>\n{body}</function>\n</tool_call>"


@pytest.mark.parametrize("parser", ["qwen3_coder", "qwen3_xml"])
def test_qwen3_xml_reads_calls_typed_by_the_tool_schemas(parser):
    text = "Let me check.\n" + _qwen_call(
        "get_weather",
        city="Paris\nFrance",
        days="2",
        metric="true",
        scale="3.0",
        tags='[1, "a"]',
        unit="c",
        extra="5",  # not in the schema: stays text
    )
    arguments = {
        "city": "Paris\nFrance",
        "days": 2,
        "metric": True,
        "scale": 3,
        "tags": [1, "a"],
        "unit": "c",
        "extra": "5",
    }
    calls = [("get_weather", arguments), TIME]
    assert_read(text + "\n" + _qwen_call("get_time"), parser, "Let me check.\n", calls, QWEN_TOOLS)


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        (
            _qwen_call("get_weather", days="2", scale="null"),
            [("get_weather", {"days": "2", "scale": "null"})],
        ),
        (  # no <tool_call> block, parameters closed by the next one
            "<function=get_time><parameter=a>1<parameter=b>x</parameter></function>",
            [("get_time", {"a": "1", "b": "x"})],
        ),
        (  # the answer ended inside a call: its closed parameters
            "<tool_call>\n<function=get_time>\n<parameter=a>\n1\n</parameter>\n<parameter=b>\nx",
            [("get_time", {"a": "1"})],
        ),
    ],
)
def test_qwen3_xml_without_a_schema_keeps_text(text, calls):
    assert_read(text, "qwen3_coder", None, calls)


@pytest.mark.parametrize(
    "text",
    ["It is <b>sunny</b>.", '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'],
)
def test_qwen3_xml_without_calls_is_content(text):
    assert_read(text, "qwen3_coder", text, [], QWEN_TOOLS)


def test_qwen3_xml_holds_back_a_partial_marker():
    deltas = ToolCallDeltas((AUTO, "qwen3_coder"), _ids(), QWEN_TOOLS)
    assert deltas.next("", "Hi <tool_c", None) == ({"content": "Hi "}, None)
    assert deltas.next("", "Hi <tool_cap", None) == ({"content": "<tool_cap"}, None)
    assert deltas.next("", "Hi <tool_cap <function", None) == ({"content": " "}, None)
