"""Reading the tool calls a model chose to make (tool_choice "auto") from its own text format,
whole and as a stream."""

from __future__ import annotations

import itertools
import json

import pytest

from pagedserve.entrypoints.openai.errors import APIError
from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas, final_answer, tool_mode
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS

TOOLS = [{"type": "function", "function": {"name": "get_weather"}}]

HERMES_TWO_CALLS = (
    "I will look both up.\n"
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
    '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}}\n'
    "</tool_call>"
)


def _ids():
    counter = itertools.count()
    return lambda: f"call-{next(counter)}"


def answer(text: str, parser: str, finish_reason: str = "stop"):
    return final_answer(text, (AUTO, parser), finish_reason, _ids())


def streamed(text: str, parser: str, step: int, finish_reason: str = "stop"):
    """Stream ``text`` ``step`` characters at a time; returns (content, calls, finish reason)."""
    deltas = ToolCallDeltas((AUTO, parser), _ids())
    content, calls, finish = "", [], None
    for end in range(step, len(text) + step, step):
        done = end >= len(text)
        delta, reason = deltas.next("", text[:end], finish_reason if done else None)
        content += delta.get("content", "")
        for call in delta.get("tool_calls", []):
            assert call["index"] == len(calls)
            calls.append(call)
        finish = reason
    return content, calls, finish


def names_and_arguments(calls) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def test_hermes_reads_content_and_every_call():
    message, finish = answer(HERMES_TWO_CALLS, "hermes")
    assert finish == "tool_calls"
    assert message["content"] == "I will look both up.\n"
    assert names_and_arguments(message["tool_calls"]) == [
        ("get_weather", {"city": "Paris"}),
        ("get_weather", {"city": "Zürich", "unit": "c"}),
    ]
    assert [c["id"] for c in message["tool_calls"]] == ["call-0", "call-1"]
    assert all(c["type"] == "function" for c in message["tool_calls"])


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_hermes_stream_gives_the_same_answer_in_any_pieces(step):
    content, calls, finish = streamed(HERMES_TWO_CALLS, "hermes", step)
    message, _ = answer(HERMES_TWO_CALLS, "hermes")
    assert finish == "tool_calls" and content == message["content"]
    assert names_and_arguments(calls) == names_and_arguments(message["tool_calls"])


def test_hermes_holds_back_what_may_be_the_start_of_a_call():
    deltas = ToolCallDeltas((AUTO, "hermes"), _ids())
    assert deltas.next("", "Sure <tool_c", None) == ({"content": "Sure "}, None)
    assert deltas.next("", "Sure <tool_cx", None) == ({"content": "<tool_cx"}, None)


def test_hermes_without_calls_is_plain_content():
    text = "It is sunny in Paris. <b>Enjoy</b>"
    assert answer(text, "hermes", "length") == ({"content": text}, "length")
    assert streamed(text, "hermes", 4, "length") == (text, [], "length")


def test_hermes_reads_a_call_left_unclosed_at_the_end():
    text = '<tool_call>{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    message, finish = answer(text, "hermes")
    assert finish == "tool_calls" and message["content"] is None
    assert names_and_arguments(message["tool_calls"]) == [("get_weather", {"city": "Oslo"})]


@pytest.mark.parametrize(
    "body", ['{"name": "get_weather", "arguments": {"city": ', '{"arguments": {}}', "[1, 2]"]
)
def test_a_malformed_hermes_call_leaves_the_answer_as_text(body):
    text = f"<tool_call>{body}</tool_call>"
    assert answer(text, "hermes") == ({"content": text}, "stop")


@pytest.mark.parametrize(
    "text",
    [
        '{"name": "get_weather", "parameters": {"city": "Lima"}}',
        '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Lima"}}',
        '  {"name": "get_weather", "arguments": {"city": "Lima"}}\n',
    ],
)
def test_llama3_json_reads_a_call(text):
    message, finish = answer(text, "llama3_json")
    assert finish == "tool_calls" and message["content"] is None
    assert names_and_arguments(message["tool_calls"]) == [("get_weather", {"city": "Lima"})]
    content, calls, finish = streamed(text, "llama3_json", 5)
    assert (content, finish) == ("", "tool_calls")
    assert names_and_arguments(calls) == [("get_weather", {"city": "Lima"})]


def test_llama3_json_reads_calls_separated_by_semicolons():
    text = (
        '{"name": "get_weather", "parameters": {"city": "Rome"}}; '
        '{"name": "get_time", "parameters": {}}'
    )
    message, _ = answer(text, "llama3_json")
    assert names_and_arguments(message["tool_calls"]) == [
        ("get_weather", {"city": "Rome"}),
        ("get_time", {}),
    ]


@pytest.mark.parametrize(
    "text", ["The weather is fine.", '{"city": "Rome"}', '{"name": "get_weather", "parameters": 3']
)
def test_llama3_json_without_a_whole_call_is_plain_content(text):
    assert answer(text, "llama3_json") == ({"content": text}, "stop")
    assert streamed(text, "llama3_json", 3) == (text, [], "stop")


def test_auto_needs_a_parser_on_the_server():
    assert tool_mode(TOOLS, "auto", "hermes") == (AUTO, "hermes")
    assert tool_mode(TOOLS, None, "hermes") == (AUTO, "hermes")
    assert tool_mode(TOOLS, "none", "hermes") is None
    for choice, param in (("auto", "tool_choice"), (None, "tools")):
        with pytest.raises(APIError, match="--enable-auto-tool-choice") as err:
            tool_mode(TOOLS, choice, None)
        assert err.value.status == 400 and err.value.param == param


MISTRAL_LIST = (
    'Looking it up. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}}, '
    '{"name": "get_time", "arguments": {}}]'
)
MISTRAL_NAME_ARGS = (
    'Looking it up. [TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{}'
)


@pytest.mark.parametrize("text", [MISTRAL_LIST, MISTRAL_NAME_ARGS])
def test_mistral_reads_both_formats(text):
    message, finish = answer(text, "mistral")
    assert finish == "tool_calls" and message["content"] == "Looking it up. "
    assert names_and_arguments(message["tool_calls"]) == [
        ("get_weather", {"city": "Paris"}),
        ("get_time", {}),
    ]
    for step in (1, 4, 1000):
        content, calls, finish = streamed(text, "mistral", step)
        assert (content, finish) == ("Looking it up. ", "tool_calls")
        assert names_and_arguments(calls) == names_and_arguments(message["tool_calls"])


def test_mistral_holds_back_a_partial_tag_and_keeps_text_without_calls():
    deltas = ToolCallDeltas((AUTO, "mistral"), _ids())
    assert deltas.next("", "Hi [TOOL_", None) == ({"content": "Hi "}, None)
    for text in ["It is sunny. [1, 2]", '[TOOL_CALLS] [{"name": "get_weather", "arguments": 3}]']:
        assert answer(text, "mistral") == ({"content": text}, "stop")


def test_mistral_call_ids_and_special_tokens():
    """Mistral's chat templates refuse call ids other than nine letters and digits, and the
    answer's text keeps the special tokens that mark its calls, so that [TOOL_CALLS] reaches
    the parser (as vLLM does)."""
    new_id = TOOL_PARSERS["mistral"].new_call_id
    ids = {new_id() for _ in range(50)}
    assert len(ids) == 50 and all(len(i) == 9 and i.isalnum() for i in ids)
    assert TOOL_PARSERS["mistral"].special_tokens == {"[TOOL_CALLS]", "[ARGS]", "[CALL_ID]"}
    assert not TOOL_PARSERS["hermes"].special_tokens


PYTHONIC = '[get_weather(city="Paris", days=[1, 2], metric=True), get_time()]'


def test_pythonic_reads_a_list_of_calls():
    message, finish = answer(PYTHONIC, "pythonic")
    assert finish == "tool_calls" and message["content"] is None
    assert names_and_arguments(message["tool_calls"]) == [
        ("get_weather", {"city": "Paris", "days": [1, 2], "metric": True}),
        ("get_time", {}),
    ]
    content, calls, finish = streamed(PYTHONIC, "pythonic", 3)
    assert (content, finish) == ("", "tool_calls")
    assert names_and_arguments(calls) == names_and_arguments(message["tool_calls"])


def test_pythonic_reads_json_literals_as_vllm_does():
    message, _ = answer("[set_alarm(on=true, label=null, snooze=false, days=[true])]", "pythonic")
    assert names_and_arguments(message["tool_calls"]) == [
        ("set_alarm", {"on": True, "label": None, "snooze": False, "days": [True]})
    ]


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        "[1, 2, 3]",
        '[get_weather("Paris")]',  # positional arguments
        "[get_weather(city=__import__('os').getcwd())]",  # not a literal: never evaluated
        "[get_weather(city={1, 2})]",  # a set: no JSON
        "[get_weather(city=",
    ],
)
def test_pythonic_without_a_list_of_calls_is_plain_content(text):
    assert answer(text, "pythonic") == ({"content": text}, "stop")
    assert streamed(text, "pythonic", 3) == (text, [], "stop")
