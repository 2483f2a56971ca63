"""The ``olmo3`` tool-call parser (OLMo 3, tool_choice "auto"): ``<function_calls>`` then a Python
call per line then ``</function_calls>``; whole answers, and streams cut at every character, or
in two at every position, giving the same answer."""

from __future__ import annotations

import pytest
from parser_answers import assert_agrees
from test_tool_parsers_granite import in_two
from test_tool_parsers_more import assert_read

from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS

PARSER = "olmo3"
PARIS = ("get_weather", {"city": "Paris", "days": 2})
TIME = ("get_time", {"zone": None, "utc": True, "dst": False})
PARIS_LINE = 'get_weather(city="Paris", days=2)'
TIME_LINE = "get_time(zone=null, utc=true, dst=False)"  # JSON's literals, or Python's
BLOCK = f"<function_calls>\n{PARIS_LINE}\n{TIME_LINE}\n</function_calls>"


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (BLOCK, None, [PARIS, TIME]),
        (f"<function_calls>{PARIS_LINE}</function_calls>", None, [PARIS]),
        (f"Let me check.\n{BLOCK}", "Let me check.\n", [PARIS, TIME]),
        (f"\n{BLOCK}\nDone.", None, [PARIS, TIME]),  # the text after the block is dropped
        (f"{BLOCK}\n<function_calls>\nget_time()\n</function_calls>", None, [PARIS, TIME]),
        (f"<function_calls>\n  {PARIS_LINE}  \n\n\t{TIME_LINE}\r\n", None, [PARIS, TIME]),  # no end
        (  # a marker and an escaped newline inside a string
            "<function_calls>\nget_weather(city='<function_calls>\\nx')\n</function_calls>",
            None,
            [("get_weather", {"city": "<function_calls>\nx"})],
        ),
        (
            '<function_calls>\nget(o={"k": [null, true, -1.5]}, t=(1, 2))\n</function_calls>',
            None,
            [("get", {"o": {"k": [None, True, -1.5]}, "t": [1, 2]})],
        ),
    ],
)
def test_olmo3_reads_its_calls(text, content, calls):
    assert_read(text, PARSER, content, calls)
    assert in_two(text, PARSER) == {(content, repr(calls), "tool_calls")}


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        PARIS_LINE,  # no block: prose or code, not a call
        "<function_calls></function_calls>",
        "<function_calls>\n\n</function_calls>",
        f"<function_calls>\n{PARIS_LINE}\nnot a call\n</function_calls>",
        f"<function_calls>\n[{PARIS_LINE}]\n</function_calls>",  # a list, not a call
        f"<function_calls>\n{PARIS_LINE}, {TIME_LINE}\n</function_calls>",  # two on a line
        '<function_calls>\nget_weather("Paris")\n</function_calls>',  # positional
        "<function_calls>\nget_weather(**kw)\n</function_calls>",
        "<function_calls>\nos.system(cmd='ls')\n</function_calls>",
        "<function_calls>\nget_weather(city=paris)\n</function_calls>",  # a name, not a literal
        "<function_calls>\nget_weather(n=1e999)\n</function_calls>",  # no JSON number
        '<function_calls>\nget_weather(city="Pa',  # cut short
        '<function_calls>\nget_weather(city="""Pa\nris""")\n</function_calls>',  # a line each
        # The block ends at its first end marker, even inside a string (as vLLM reads it).
        "<function_calls>\nget_weather(city='</function_calls>')\n</function_calls>",
        "Say <function_calls",
        "Say <function_calls>",
    ],
)
def test_olmo3_without_a_block_of_calls_is_content(text):
    assert_read(text, PARSER, text, [])
    assert_agrees(text, [len(text) // 2, len(text)], PARSER)


def test_olmo3_streams_the_calls_once_the_block_closes():
    deltas = ToolCallDeltas((AUTO, PARSER), lambda: "call-0")
    assert deltas.next("", "Hi <function_", None) == ({"content": "Hi "}, None)
    assert deltas.next("", f"Hi <function_calls>\n{PARIS_LINE}\n", None) == ({}, None)
    delta, _ = deltas.next("", f"Hi <function_calls>\n{PARIS_LINE}\n</function_calls>", None)
    assert [c["function"]["name"] for c in delta["tool_calls"]] == ["get_weather"]
    assert not TOOL_PARSERS[PARSER].special_tokens  # its markers are text


@pytest.mark.parametrize(
    "text",
    [
        "<function_calls>" * 20000,
        "<function_calls>\n" + "get_time()\n" * 5000,
        "<function_calls>\nget_time()\n</function_calls>" + "x" * 20000,
    ],
)
def test_olmo3_reads_a_long_answer(text):
    assert_agrees(text, list(range(997, len(text), 997)) + [len(text)], PARSER)
