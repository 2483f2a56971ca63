"""The ``deepseek_v3`` tool-call parser (DeepSeek-V3, R1 and R1's distills, tool_choice "auto"):
``<｜tool▁calls▁begin｜>``, then ``<｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME`` and its
arguments in a ```json fence, ``<｜tool▁call▁end｜>`` per call; whole answers, and streams cut at
every character, or in two at every position, giving the same answer."""

from __future__ import annotations

import pytest
from parser_answers import assert_agrees
from test_tool_parsers_granite import in_two
from test_tool_parsers_more import assert_read

from pagedserve.engine.detokenizer import decoded
from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas
from pagedserve.entrypoints.openai.tool_parser_base import dumps
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedserve.tokenizer import load_tokenizer

PARSER = "deepseek_v3"
BEGIN, END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
PARIS = ("get_weather", {"city": "Paris", "days": 2})
TIME = ("get_time", {})


def block(name: str, arguments: str, kind: str = "function") -> str:
    """One call as DeepSeek's chat template writes it."""
    return f"{CALL}{kind}{SEP}{name}\n```json\n{arguments}\n```{CALL_END}"


PARIS_CALL = block("get_weather", '{"city": "Paris", "days": 2}')
TIME_CALL = block("get_time", "{}")
CALLS = f"{BEGIN}{PARIS_CALL}\n{TIME_CALL}{END}"


@pytest.mark.parametrize(
    ("text", "content", "calls"),
    [
        (CALLS, None, [PARIS, TIME]),
        (f"{BEGIN}{PARIS_CALL}{END}", None, [PARIS]),
        (f"Let me check.\n\n{CALLS}", "Let me check.\n\n", [PARIS, TIME]),
        (f"\n{CALLS}\nDone.", None, [PARIS, TIME]),  # the text after the calls is dropped
        (f"{BEGIN}{PARIS_CALL} between {TIME_CALL}", None, [PARIS, TIME]),  # no end marker
        (f"{CALLS}{BEGIN}{TIME_CALL}{END}", None, [PARIS, TIME, TIME]),  # read after the end
        (  # arguments over lines, whitespace around them and the fences
            f'{BEGIN}{CALL}function{SEP}get_weather\n```json  \n{{\n  "city": "Paris",\n'
            f'  "days": 2\n}}  \n\n```\n{CALL_END}{END}',
            None,
            [PARIS],
        ),
        (  # markers (but the block's end), a fence and escapes inside a string
            BEGIN + block("get", f'{{"s": "{CALL}{SEP}\\n```\\"", "o": {{"k": [null, true]}}}}'),
            None,
            [("get", {"s": f'{CALL}{SEP}\n```"', "o": {"k": [None, True]}})],
        ),
        (  # a block that is no call is left out, before or after calls, as vLLM reads it
            f"{BEGIN}{block('get_time', 'nope')}{PARIS_CALL}{block('x', '[1]')}{TIME_CALL}",
            None,
            [PARIS, TIME],
        ),
        (f"{BEGIN}{PARIS_CALL}{CALL}function{SEP}get_time\n```json\n{{}}", None, [PARIS]),  # cut
        (f"{BEGIN}{block('get weather', '{}')}", None, [("get weather", {})]),  # as written
    ],
)
def test_deepseek_v3_reads_its_calls(text, content, calls):
    assert_read(text, PARSER, content, calls)
    assert in_two(text, PARSER) == {(content, repr(calls), "tool_calls")}


@pytest.mark.parametrize(
    "text",
    [
        "The weather is fine.",
        PARIS_CALL,  # no calls-begin marker: text, as vLLM reads it
        f"Sure. {PARIS_CALL}{END}",
        f"{BEGIN}{END}",
        f"Let me check. {BEGIN}",
        f"{BEGIN}{CALL}function{SEP}get_weather\n```json\n{{}}",  # cut short
        f"{BEGIN}{block('get_weather', '{}', kind='tool')}",  # not a function
        f"{BEGIN}{block('get_weather', '{}', kind=' function')}",
        f"{BEGIN}{block('', '{}')}",  # no name
        f"{BEGIN}{block('  ', '{}')}",
        f"{BEGIN}{block(f'a{CALL}b', '{}')}",  # a marker in the name
        f"{BEGIN}{CALL}{CALL}function{SEP}get\n```json\n{{}}\n```{CALL_END}",
        f"{BEGIN}{block('get', '[1, 2]')}",  # arguments that are no object
        f"{BEGIN}{block('get', 'null')}",
        BEGIN + block("get", '{"a": NaN}'),  # no JSON
        BEGIN + block("get", '{"a": 1e999}'),
        BEGIN + block("get", '{"s": "\\ud83c"}'),  # a lone surrogate
        f"{BEGIN}{block('get', '{} {}')}",  # two values
        BEGIN + block("get", '{"a": 1'),
        f"{BEGIN}{CALL}function{SEP}get\n{{}}\n{CALL_END}",  # no fences
        f"{BEGIN}{CALL}function{SEP}get\n```json\n{{}}{CALL_END}",  # no closing fence
        f"{BEGIN}{CALL}function{SEP}get ```json\n{{}}\n```{CALL_END}",  # no newline
        f"{BEGIN}{CALL}function{SEP}get\n```\n{{}}\n```{CALL_END}",  # not a json fence
        # A block ends at its first end marker, even inside a string.
        f'{BEGIN}{CALL}function{SEP}get\n```json\n{{"s": "{CALL_END}"}}\n```{CALL_END}',
        "Say <｜tool▁calls",
        f"Say {BEGIN[:-1]}",
    ],
)
def test_deepseek_v3_without_a_call_is_content(text):
    assert_read(text, PARSER, text, [])
    assert_agrees(text, [len(text) // 2, len(text)], PARSER)


def test_deepseek_v3_streams_each_call_once_its_block_ends_and_keeps_its_markers():
    deltas = ToolCallDeltas((AUTO, PARSER), lambda: "call-0")
    assert deltas.next("", "Hi <｜tool▁calls▁", None) == ({"content": "Hi "}, None)
    assert deltas.next("", f"Hi {BEGIN}{PARIS_CALL[:-1]}", None) == ({}, None)
    delta, _ = deltas.next("", f"Hi {BEGIN}{PARIS_CALL}", None)
    assert [c["function"]["name"] for c in delta["tool_calls"]] == ["get_weather"]
    assert TOOL_PARSERS[PARSER].special_tokens == {BEGIN, END, CALL, CALL_END, SEP}


def test_deepseek_v3_s_markers_stay_in_the_text_other_special_tokens_do_not(smollm2_path):
    """With the markers special tokens, as in DeepSeek's tokenizers, the answer's text keeps
    them (and so its calls) while ``<｜end▁of▁sentence｜>`` is dropped."""
    tokenizer = load_tokenizer(smollm2_path)
    parser = TOOL_PARSERS[PARSER]
    tokenizer.add_tokens([*sorted(parser.special_tokens), "<｜end▁of▁sentence｜>"], True)
    ids = tokenizer.encode(f"Hi{CALLS}<｜end▁of▁sentence｜>", add_special_tokens=False)
    assert tokenizer.convert_ids_to_tokens(ids[1]) == BEGIN  # each marker a single token
    text = decoded(tokenizer, ids, True, parser.special_tokens)
    assert text == f"Hi{CALLS}"
    assert parser().split(text, True) == ("Hi", [(n, dumps(a)) for n, a in (PARIS, TIME)])


@pytest.mark.parametrize(
    "text",
    [
        BEGIN * 20000,
        BEGIN + CALL * 20000,
        BEGIN + TIME_CALL * 3000,
        BEGIN + f"{CALL}function{SEP}get\n```json\n" + "[" * 5000,
        CALLS + "x" * 20000,
    ],
)
def test_deepseek_v3_reads_a_long_answer(text):
    assert_agrees(text, list(range(997, len(text), 997)) + [len(text)], PARSER)
