"""Llama 4's tool-call parsers (tool_choice "auto"): ``llama4_pythonic`` (a Python list of calls,
optionally in ``<|python_start|>`` ... ``<|python_end|>``) and ``llama4_json``, which is vLLM's
name for ``llama3_json`` (as ``qwen3_json`` is for ``hermes``); whole answers, and streams cut
at every character, or in two at every position, giving the same answer."""

from __future__ import annotations

import pytest
from parser_answers import assert_agrees
from test_tool_parsers_granite import in_two
from test_tool_parsers_more import assert_read

from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS

PARSER = "llama4_pythonic"
START, END = "<|python_start|>", "<|python_end|>"
PARIS = ("get_weather", {"city": "Paris", "days": [1, 2], "metric": True})
TIME = ("get_time", {})
LIST = '[get_weather(city="Paris", days=[1, 2], metric=True), get_time()]'


@pytest.mark.parametrize(
    "text",
    [
        LIST,
        f"{START}{LIST}{END}",
        f"{START}{LIST}",  # the model ended without its end
        f" {START}\n{LIST}\n{END}\n",
        f"\n{LIST}\n",
        LIST.replace("True", "true"),  # JSON's literals, as vLLM reads them
    ],
)
def test_llama4_pythonic_reads_a_list_of_calls_bare_or_wrapped(text):
    assert_read(text, PARSER, None, [PARIS, TIME])
    assert in_two(text, PARSER) == {(None, repr([PARIS, TIME]), "tool_calls")}


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        f"Let me check. {START}{LIST}{END}",  # text before the calls: all text, as in vLLM
        f"{START}{LIST}{END} Done.",  # text after them
        f"{LIST}{END}",  # an end without its start
        f"{START}{LIST}{END}{END}",
        f"{START}[get_weather(city='{END}')",  # cut short
        f"{START}print('hi'){END}",
        f"{START}{END}",
        f"{START}[]{END}",
        f'{START}[get_weather("Paris")]{END}',  # positional arguments
        f"{START}[get_weather(city={{1, 2}})]{END}",  # a set: no JSON
        "<|python_sta",
        "<|python_start",
    ],
)
def test_llama4_pythonic_without_a_whole_list_of_calls_is_content(text):
    assert_read(text, PARSER, text, [])
    assert_agrees(text, [len(text) // 2, len(text)], PARSER)


def test_llama4_pythonic_keeps_a_string_holding_its_markers():
    text = f"{START}[get_weather(city='{START}x{END}')]{END}"
    assert_read(text, PARSER, None, [("get_weather", {"city": f"{START}x{END}"})])


def test_llama4_pythonic_holds_back_what_may_be_its_wrapper_then_releases_it():
    deltas = ToolCallDeltas((AUTO, PARSER), lambda: "call-0")
    assert deltas.next("", "<|python_", None) == ({}, None)
    assert deltas.next("", "<|python_x", None) == ({"content": "<|python_x"}, None)
    deltas = ToolCallDeltas((AUTO, PARSER), lambda: "call-0")
    assert deltas.next("", f"{START}{LIST}{END}", None) == ({}, None)  # read once whole
    delta, finish = deltas.next("", f"{START}{LIST}{END}", "stop")
    assert [c["function"]["name"] for c in delta["tool_calls"]] == ["get_weather", "get_time"]
    assert finish == "tool_calls" and "content" not in delta


def test_llama4_pythonic_keeps_its_special_tokens_in_the_text():
    """Llama 4's tokenizer has the wrapper as special tokens, which the answer's text must keep
    to be read (and the answer drops the other special tokens, as for Mistral)."""
    assert TOOL_PARSERS[PARSER].special_tokens == {START, END}
    assert not TOOL_PARSERS["pythonic"].special_tokens


@pytest.mark.parametrize(
    ("alias", "parser"), [("llama4_json", "llama3_json"), ("qwen3_json", "hermes")]
)
def test_vllm_s_aliases_are_the_same_parsers(alias, parser):
    assert TOOL_PARSERS[alias] is TOOL_PARSERS[parser]


@pytest.mark.parametrize(
    ("parser", "text", "content"),
    [
        ("llama4_json", '<|python_tag|>{"name": "get_time", "parameters": {}}', None),
        (
            "qwen3_json",
            'Sure.\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>',
            "Sure.\n",
        ),
    ],
)
def test_vllm_s_aliases_read_their_calls(parser, text, content):
    assert_read(text, parser, content, [TIME])
