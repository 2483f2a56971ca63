"""The ``granite-20b-fc`` tool-call parser (granite-20b-functioncalling, tool_choice "auto"):
``<function_call> {json}`` repeated; whole answers, and streams cut at every character, or in
two at every position, giving the same answer."""

from __future__ import annotations

import pytest
from parser_answers import assert_agrees
from test_tool_parsers_granite import in_two
from test_tool_parsers_more import assert_read

from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS

PARSER = "granite-20b-fc"
PARIS = ("get_weather", {"city": "Paris"})
TIME = ("get_time", {})
PARIS_CALL = '<function_call> {"name": "get_weather", "arguments": {"city": "Paris"}}'
TIME_CALL = '<function_call> {"name": "get_time", "arguments": {}}'


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (PARIS_CALL, None, [PARIS]),
        (f"{PARIS_CALL}\n{TIME_CALL}", None, [PARIS, TIME]),
        (f"{PARIS_CALL}{TIME_CALL}\n", None, [PARIS, TIME]),
        (f"Let me check.\n{PARIS_CALL} done {TIME_CALL}", "Let me check.\n", [PARIS, TIME]),
        ('<function_call>{"name": "get_time"}', None, [TIME]),  # arguments left out
        (  # the marker inside a string of the arguments is no call
            '<function_call> {"name": "get_weather", "arguments": {"city": "<function_call>"}}',
            None,
            [("get_weather", {"city": "<function_call>"})],
        ),
    ],
)
def test_granite_20b_fc_reads_its_calls(text, content, calls):
    assert_read(text, PARSER, content, calls)
    assert in_two(text, PARSER) == {(content, repr(calls), "tool_calls")}


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        "<function_call> not json",
        '<function_call> {"arguments": {}}',  # no name
        '<function_call> {"name": "get_weather", "arguments": [1]}',
        '<function_call> {"name": "get_weather", "arguments": {"city": "Par',  # cut short
        '<function_call> ["get_weather"]',
        f"<function_call> 42 {PARIS_CALL}",  # the first call is no call
        "Say <function_call",
    ],
)
def test_granite_20b_fc_without_a_first_call_is_content(text):
    assert_read(text, PARSER, text, [])
    assert_agrees(text, [len(text) // 2, len(text)], PARSER)


@pytest.mark.parametrize(
    ("text", "calls"),
    [
        (f"{PARIS_CALL} <function_call> not json {TIME_CALL}", [PARIS, TIME]),
        (f'{PARIS_CALL} <function_call> {{"name": 1}} {TIME_CALL}', [PARIS, TIME]),
        (f'{PARIS_CALL} <function_call> {{"na {TIME_CALL}', [PARIS, TIME]),
        (f'{PARIS_CALL} <function_call> {{"name": "get_ti', [PARIS]),  # cut short
    ],
)
def test_granite_20b_fc_keeps_its_calls_beside_one_that_is_no_call(text, calls):
    # A stream has sent the calls before it; vLLM would take the whole answer back as text.
    assert_read(text, PARSER, None, calls)


def test_granite_20b_fc_holds_back_a_partial_marker_then_releases_it():
    deltas = ToolCallDeltas((AUTO, PARSER), lambda: "call-0")
    assert deltas.next("", "Hi <function_", None) == ({"content": "Hi "}, None)
    assert deltas.next("", "Hi <function_x", None) == ({"content": "<function_x"}, None)


def test_granite_20b_fc_streams_each_call_once_its_json_is_whole():
    deltas = ToolCallDeltas((AUTO, PARSER), lambda: "call-0")
    delta, _ = deltas.next("", PARIS_CALL[:-1], None)
    assert delta == {}
    delta, _ = deltas.next("", PARIS_CALL, None)
    assert [c["function"]["name"] for c in delta["tool_calls"]] == ["get_weather"]
    assert not TOOL_PARSERS[PARSER].special_tokens  # its marker is text


@pytest.mark.parametrize(
    "text", ["<function_call>" * 20000, '<function_call>{"name": "' * 8000, PARIS_CALL * 3000]
)
def test_granite_20b_fc_reads_a_repeated_marker_in_one_pass(text):
    assert_agrees(text, [len(text) // 2, len(text)], PARSER)
