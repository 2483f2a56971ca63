"""Answers the parser fuzzing (tests/test_parser_fuzz.py) found mishandled, each kept as the
smallest input that showed it."""

from __future__ import annotations

import pytest
from parser_answers import assert_agrees, whole

BIG = "9" * 5000  # more digits than Python turns into an int


@pytest.mark.parametrize(
    "text, parser",
    [
        # Python's JSON reader takes NaN and Infinity, and 1e999 as infinity: the call went out
        # with arguments no client can parse. Such a call is malformed: the answer stays text.
        ('<tool_call>{"name": "get", "arguments": {"a": -Infinity}}</tool_call>', "hermes"),
        ('{"name": "get", "arguments": {"n": NaN}}', "llama3_json"),
        ('{"name": "get", "arguments": {"n": 1e999}}', "llama3_json"),
        ('[TOOL_CALLS][{"name": "get", "arguments": {"n": NaN}}]', "mistral"),
        ("[get(n=1e999)]", "pythonic"),
        ("[get(n=-1e999)]", "pythonic"),
        ('functools[{"name": "get", "arguments": {"n": Infinity}}]', "phi4_mini_json"),
        # An integer of over 4300 digits raised ValueError (a 500) from the JSON reader.
        ('<tool_call>{"name": "get", "arguments": {"n": ' + BIG + "}}</tool_call>", "hermes"),
        ('<tool_call>{"name": "get", "arguments": {"n": ' + BIG + "}}</tool_call>", "granite4"),
        ('{"name": "get", "arguments": {"n": ' + BIG + "}}", "llama3_json"),
        ('<|tool_call|>[{"name": "get", "arguments": {"n": ' + BIG + "}}]", "granite"),
        ('[{"name": "get", "arguments": {"n": ' + BIG + "}}]", "xlam"),
        # Nesting too deep raised RecursionError from the JSON reader.
        ('{"a": ' * 3000, "llama3_json"),
        ("[" * 3000, "xlam"),
        ('<tool_call>{"name": "get", "arguments": ' + "[" * 3000, "hermes"),
    ],
)
def test_json_no_client_can_read_is_no_call(text, parser):
    assert whole(text, parser).calls == []
    assert_agrees(text, [len(text) // 2, len(text)], parser)


@pytest.mark.parametrize("parser", ["qwen3_xml", "qwen3_coder"])
def test_qwen3_xml_keeps_an_integer_python_cannot_read_as_text(parser):
    # int() of over 4300 digits raised ValueError (a 500) for a parameter typed integer.
    text = f"<function=get><parameter=a>\n{BIG}\n</parameter></function>"
    assert whole(text, parser).calls == [("get", '{"a": "' + BIG + '"}')]
    assert_agrees(text, [30, len(text)], parser)


def test_functiongemma_keeps_a_value_json_cannot_carry_as_text():
    # NaN was read as a float and went out as the bare NaN, which is no JSON.
    text = "<start_function_call>call:get{n:<escape>NaN<escape>}<end_function_call>"
    assert whole(text, "functiongemma").calls == [("get", '{"n": "NaN"}')]
    assert_agrees(text, [len(text)], "functiongemma")


@pytest.mark.parametrize(
    "text, parser",
    [
        ('<tool_call>{"name": "get", "arguments": {"s": "\\ud83c"}}</tool_call>', "hermes"),
        ('[{"name": "get", "arguments": {"s": "\\uDC00x"}}]', "xlam"),
        ('[get(s="\\ud83c")]', "pythonic"),
    ],
)
def test_a_lone_surrogate_is_no_call(text, parser):
    # JSON's "\ud83c" (and Python's) reads as a lone surrogate, which failed the answer's UTF-8
    # encoding: a 500, or a stream broken off.
    assert whole(text, parser).calls == []
    assert_agrees(text, [len(text)], parser)


def test_a_paired_surrogate_escape_is_its_character():
    text = '<tool_call>{"name": "get", "arguments": {"s": "\\ud83c\\udf89"}}</tool_call>'
    assert whole(text, "hermes").calls == [("get", '{"s": "🎉"}')]


@pytest.mark.parametrize("text", [" ", "\n", "\t\r\n"])
def test_a_blank_answer_streams_as_it_reads_whole(text):
    # granite4 (and the other parsers that leave out blank content beside calls) streamed a
    # blank answer without calls as no content; whole, it is its text.
    assert whole(text, "granite4").content == text
    assert_agrees(text, [len(text)], "granite4")


@pytest.mark.parametrize(
    "text, parser",
    [
        ('<tool_call>{"name": "get", "arguments": "not json"}</tool_call>', "granite4"),
        ('<tool_call>{"name": "get", "arguments": "[1]"}</tool_call>', "granite4"),
        ('[{"name": "get", "arguments": "just a string"}]', "xlam"),
    ],
)
def test_arguments_that_are_a_string_of_no_json_object_are_no_call(text, parser):
    # A string of arguments went out as written, "not json" included.
    assert whole(text, parser).calls == []
    assert_agrees(text, [len(text) // 2, len(text)], parser)


GOOD = '<tool_call>{"name": "get", "arguments": {"a": 1}}</tool_call>'


@pytest.mark.parametrize(
    "text, parser, content",
    [
        (GOOD + "<tool_call>not json</tool_call>", "hermes", ""),
        (GOOD + "<tool_call>not json", "hermes", ""),
        (GOOD + "<tool_call>not json</tool_call>", "granite4", "<tool_call>not json</tool_call>"),
        (GOOD + '<tool_call>{"name": ', "granite4", '<tool_call>{"name": '),
    ],
)
def test_a_malformed_block_after_a_call_keeps_the_call(text, parser, content):
    # The stream sent the first call as soon as its block closed; the whole answer then took
    # it back (all text), so the two disagreed. After a call, such a block is no longer taken
    # as a reason to read the answer as text.
    assert whole(text, parser).calls == [("get", '{"a": 1}')]
    assert whole(text, parser).content == content
    assert_agrees(text, [len(GOOD), len(text)], parser)


@pytest.mark.parametrize("parser", ["hermes", "granite4"])
def test_a_malformed_first_block_leaves_the_answer_text_whole_and_streamed(parser):
    # hermes streamed the calls after a malformed first block, which the whole answer (all
    # text) does not have.
    text = "<tool_call>not json</tool_call>" + GOOD + " ok"
    assert whole(text, parser).calls == []
    assert_agrees(text, [31, 31 + len(GOOD), len(text)], parser)


@pytest.mark.parametrize(
    "text", ["[" + "1+" * 3000 + "1]", "[get(x=" + "-" * 3000 + "1)]", "[" + "-" * 10000 + "1]"]
)
def test_pythonic_reads_python_nested_past_its_parser_as_text(text):
    # ast.parse raised RecursionError (a few thousand operators), or MemoryError (its stack
    # overflowing), from an answer that opens with "[": a 500.
    assert whole(text, "pythonic").content == text
    assert_agrees(text, [1, len(text)], "pythonic")


@pytest.mark.parametrize(
    "text, parser",
    [("<tool_call>" * 20000, "hermes"), ("<function=get>" + "<parameter=a" * 3000, "qwen3_xml")],
)
def test_a_tag_repeated_without_its_end_reads_at_once(text, parser):
    # A model looping on one tag: hermes's lazy regex, tried from each open tag, took time
    # quadratic in the answer (some 40 s for this one), on every streamed step; qwen3_xml's
    # parameter key did the same. Now both read it in a single pass.
    expected = whole(text, parser)
    assert expected.calls == ([] if parser == "hermes" else [("get", "{}")])
    assert_agrees(text, [len(text) // 2, len(text)], parser)


@pytest.mark.parametrize("block", ["```", "```json", "<tool_call>"])
def test_xlam_reads_many_blocks_that_are_no_calls_in_one_pass(block):
    # Each block that was no call copied the rest of the answer (and searched it again for
    # every marker): quadratic in the answer, on every streamed step.
    text = block * (60000 // len(block)) + '```json\n[{"name": "get", "arguments": {}}]\n```'
    assert whole(text, "xlam").calls == [("get", "{}")]
    assert_agrees(text, [len(text) // 2, len(text)], "xlam")


HERMES_CALL = '<tool_call>{"name": "get", "arguments": {"a": 1}}</tool_call>'


@pytest.mark.parametrize(
    "text, parser",
    [
        (HERMES_CALL + "\n" + HERMES_CALL, "hermes"),
        ("\n" + HERMES_CALL, "hermes"),
        (" \n" + HERMES_CALL + "\n" + HERMES_CALL + "\n", "hermes"),
        (HERMES_CALL + "\n" + HERMES_CALL + "\n", "granite4"),
        ('\n[TOOL_CALLS][{"name": "get", "arguments": {}}]', "mistral"),
        ("\n[get()]", "pythonic"),
        ('\n\n{"name": "get", "parameters": {}}', "llama3_json"),
        ('\n[{"name": "get", "arguments": {}}]\n', "xlam"),
        ("\n<function=get><parameter=a>\n1\n</parameter></function>\n", "qwen3_xml"),
    ],
)
def test_blank_content_beside_calls_is_not_streamed(text, parser):
    # The whole answer gives content null for the whitespace around its calls; the stream sent
    # it ("\n"), so a client joining the deltas read content the whole answer has not.
    assert whole(text, parser).content == ""
    assert whole(text, parser).calls
    assert_agrees(text, [len(text)], parser)
    assert_agrees(text, list(range(1, len(text) + 1)), parser)


@pytest.mark.parametrize("parser", ["hermes", "pythonic", "granite4"])
def test_blank_start_of_content_streams_with_the_text_after_it(parser):
    # Whitespace held back while calls may follow goes out with the content after it.
    text = "\n\nHello"
    assert whole(text, parser).content == text
    assert_agrees(text, list(range(1, len(text) + 1)), parser)
