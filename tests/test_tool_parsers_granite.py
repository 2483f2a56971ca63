"""The tool-call parsers of IBM Granite (tool_choice "auto"): ``granite`` (3.0/3.1, a JSON list
after ``<|tool_call|>`` or ``<tool_call>``) and ``granite4`` (a ``<tool_call>`` block per call);
whole answers, and streams cut at every character, or in two at every position, giving the same
answer."""

from __future__ import annotations

import pytest
from test_tool_parsers_more import _ids, answer, assert_read, names_and_arguments

from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS

PARIS = ("get_weather", {"city": "Paris"})
TIME = ("get_time", {})
LIST = '[{"name": "get_weather", "arguments": {"city": "Paris"}}, {"name": "get_time"}]'
PARIS_BLOCK = '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
TIME_BLOCK = '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>'


def in_two(text: str, parser: str):
    """``(content, calls, finish)`` of ``text`` streamed in two deltas, cut at every position
    (a marker split across them): the same for every cut."""
    seen = set()
    for cut in range(1, len(text)):
        deltas = ToolCallDeltas((AUTO, parser), _ids())
        first, _ = deltas.next("", text[:cut], None)
        second, finish = deltas.next("", text, "stop")
        content = first.get("content", "") + second.get("content", "")
        calls = first.get("tool_calls", []) + second.get("tool_calls", [])
        seen.add((content or None, repr(names_and_arguments(calls)), finish))
    return seen


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (f"<|tool_call|>{LIST}", None, [PARIS, TIME]),
        (f"<tool_call> {LIST}", None, [PARIS, TIME]),  # Granite 3.1's marker is text
        (f"Let me check.\n<|tool_call|>\n{LIST}\nDone.", "Let me check.\n\nDone.", [PARIS, TIME]),
        (  # a list in the arguments
            '<|tool_call|>[{"name": "get_weather", "arguments": {"days": [1, 2]}}]',
            None,
            [("get_weather", {"days": [1, 2]})],
        ),
    ],
)
def test_granite_reads_its_calls(text, content, calls):
    assert_read(text, "granite", content, calls)
    assert in_two(text, "granite") == {(content, repr(calls), "tool_calls")}


@pytest.mark.parametrize(
    "text",
    [
        "It is sunny in Paris.",
        '<|tool_call|>[{"name": "get_weather", "arguments": {"city": ',  # cut short
        '<|tool_call|>[{"arguments": {}}]',  # no name
        '<tool_call>{"name": "get_time", "arguments": {}}</tool_call>',  # granite4's format
        "<|tool_call|> and then nothing",
    ],
)
def test_granite_without_whole_calls_is_content(text):
    assert_read(text, "granite", text, [])
    assert in_two(text, "granite") == {(text, "[]", "stop")}


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (PARIS_BLOCK, None, [PARIS]),
        (f"{PARIS_BLOCK}\n{TIME_BLOCK}", None, [PARIS, TIME]),
        (
            f"Let me check. {PARIS_BLOCK} and {TIME_BLOCK} Done.",
            "Let me check.  and  Done.",
            [PARIS, TIME],
        ),
        (  # arguments already a JSON text are kept as they are
            '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Paris\\"}"}'
            "</tool_call>",
            None,
            [PARIS],
        ),
    ],
)
def test_granite4_reads_its_calls(text, content, calls):
    assert_read(text, "granite4", content, calls)
    assert in_two(text, "granite4") == {(content, repr(calls), "tool_calls")}


@pytest.mark.parametrize(
    "text",
    [
        "It is <b>sunny</b> in Paris.",
        "<tool_call>not json</tool_call>",  # the first block is no call: all text
        '<tool_call>{"name": "get_time", ',  # cut inside the first call
        '<tool_call>{"name": "get_time"}</tool_call>',  # no arguments
        '<tool_call>{"name": "get_time", "arguments": "not json"}</tool_call>',
    ],
)
def test_granite4_with_a_block_that_is_no_call_is_all_content(text):
    content, calls, finish = answer(text, "granite4")
    assert (content, calls, finish) == (text, [], "stop")


@pytest.mark.parametrize(
    "after",
    [" <tool_call>not json</tool_call>", ' <tool_call>{"name": "get_time", '],  # cut inside
)
def test_granite4_after_a_call_a_block_that_is_no_call_is_content(after):
    # A stream has sent the call by then; vLLM would take the whole answer back as text.
    assert_read(PARIS_BLOCK + after, "granite4", after, [PARIS])


def test_granite4_streams_content_around_its_calls():
    deltas = ToolCallDeltas((AUTO, "granite4"), _ids())
    assert deltas.next("", "Let me <tool_c", None) == ({"content": "Let me "}, None)
    delta, _ = deltas.next("", f"Let me {PARIS_BLOCK} and", None)
    assert delta["content"] == " and" and len(delta["tool_calls"]) == 1


def test_both_keep_special_tokens():
    assert TOOL_PARSERS["granite"].special_tokens == {"<|tool_call|>", "<tool_call>"}
    assert TOOL_PARSERS["granite4"].special_tokens == {"<tool_call>", "</tool_call>"}
