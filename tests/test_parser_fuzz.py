"""Fuzzing of every tool-call and reasoning parser: whatever a model writes, the answer reads
without an error, streamed in any pieces it is the answer read whole, and every call's
arguments are JSON a client can parse (see :func:`tests.parser_answers.assert_agrees`).

The texts are random mixes of the parsers' own markers, whole calls in each format, JSON and
Python fragments (whole, cut short, nested, with escapes, numbers JSON cannot carry), unicode
and plain text; each is streamed cut at random places (the stream's deltas are ``str``, so a
cut falls between code points). Seeded, so a run is the same each time; a failure names the
text and cuts to add to tests/test_parser_fuzz_regressions.py.
"""

from __future__ import annotations

import random

import pytest
from parser_answers import assert_agrees

from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedserve.reasoning_parsers import REASONING_PARSERS

ARGS = ['{"a": 1}', "{}", '{"o": {"k": [1, null, "é🎉"]}, "b": true}', '{"s": "\\"\\u00e9\\n"}']
CALLS = [
    '{"name": "get", "arguments": ARGS}',
    '{"name": "time", "parameters": ARGS}',
    '[{"name": "get", "arguments": ARGS}, {"name": "time", "arguments": {}}]',
    "<tool_call>\n{CALL}\n</tool_call>",
    "[TOOL_CALLS][{CALL}]",
    "[TOOL_CALLS]get[ARGS]ARGS",
    "[TOOL_CALLS]get[CALL_ID]a1b2c3d4e[ARGS]ARGS",
    "<|python_tag|>{CALL}",
    "functools[{CALL}]",
    "<|tool_call|>[{CALL}]",
    "```json\n[{CALL}]\n```",
    "</think>\n[{CALL}]",
    "<tool_call>\n<function=get>\n<parameter=a>\n7\n</parameter>\n</function>\n</tool_call>",
    "<function=time><parameter=o>\n{PY}\n</parameter></function>",
    "<start_function_call>call:get{a:<escape>1<escape>,s:<escape>x{y}<escape>}<end_function_call>",
    '[get(a=1, o={"k": [1, None]}), time()]',
    "[get(PY)]",
    "{CALL}; {CALL}",
    "<function_call> {CALL}",
    "<|python_start|>[get(a=-1.5), time()]<|python_end|>",
    "<|python_start|>[get(PY)]",
    "<function_calls>\nget(a=1, o={'k': [null]}, b=true)\ntime()\n</function_calls>",
    "<function_calls>\ntime(PY)\n</function_calls>",
    "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\nARGS\n```"
    "<｜tool▁call▁end｜>\n<｜tool▁call▁begin｜>function<｜tool▁sep｜>time\n```json\n{}\n```"
    "<｜tool▁call▁end｜><｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>function<｜tool▁sep｜>get\n```json\nARGS\n```<｜tool▁call▁end｜>",
]
FRAGMENTS = [
    "null",
    "[1, 2]",
    '"just a string"',
    '{"name": 3}',
    '{"name": "get", "arguments": null}',
    '{"name": "get", "arguments": "{\\"a\\": 1}"}',
    '{"name": "get", "arguments": "not json"}',
    '{"name": "get"}',
    '{"n": NaN}',
    '{"n": -Infinity}',
    '{"n": 1e999}',
    '{"n": ' + "9" * 4400 + "}",
    "[" * 1200,
    '{"a": ' * 1200,
    '{"s": "\\ud83c"}',
    "a=1e999",
    "a={1, 2}",
    "a=b'x'",
    "a=1j",
    "**k",
    "a=x.y",
    "a=(" * 300,
    "a=" + "-" * 3000 + "1",
    "a=" + "1+" * 3000 + "1",
]
MARKERS = [
    "<tool_call>",
    "</tool_call>",
    "[TOOL_CALLS]",
    "[ARGS]",
    "<|tool_call|>",
    "<|python_tag|>",
    "<function_call>",
    "<|python_start|>",
    "<|python_end|>",
    "<function_calls>",
    "</function_calls>",
    "<｜tool▁calls▁begin｜>",
    "<｜tool▁calls▁end｜>",
    "<｜tool▁call▁begin｜>",
    "<｜tool▁call▁end｜>",
    "<｜tool▁sep｜>",
    "function<｜tool▁sep｜>get\n```json\n",
    "functools[",
    "<function=get>",
    "</function>",
    "<parameter=a>",
    "</parameter>",
    "<start_function_call>",
    "<end_function_call>",
    "call:get{",
    "<escape>",
    "```json",
    "```",
    "<think>",
    "</think>",
    "[THINK]",
    "[/THINK]",
    "Here is my thought process:",
    "Here's my response:",
]
TEXT = [
    "Hello",
    "the weather in Zürich",
    "42",
    " ",
    "\n",
    "\t\r\n",
    ";",
    "[",
    "]",
    "{",
    "}",
    "e\u0301",
    "🎉",
    "👩\u200d👩\u200d👧",
    "مرحبا",
    "\u202e",
    "\ufeff",
    "\x00",
    "中文",
]


def _call(rng: random.Random) -> str:
    call = rng.choice(CALLS)
    for hole, pool in (("{CALL}", CALLS[:2]), ("ARGS", ARGS + FRAGMENTS), ("PY", FRAGMENTS)):
        while hole in call:
            call = call.replace(hole, rng.choice(pool), 1)
    return call


def _text(rng: random.Random) -> str:
    if rng.random() < 0.25:  # only calls, as most answers that call are
        return rng.choice(["", " ", "\n"]) + _call(rng) + rng.choice(["", "\n"])
    pieces = [_call(rng)] if rng.random() < 0.3 else []
    for _ in range(rng.randint(1, 7)):
        kind = rng.random()
        if kind < 0.35:
            piece = _call(rng)
        elif kind < 0.5:
            piece = rng.choice(FRAGMENTS)
        elif kind < 0.75:
            piece = rng.choice(MARKERS)
        else:
            piece = rng.choice(TEXT)
        if rng.random() < 0.15:  # cut short, as an answer stopped by max_tokens
            piece = piece[: rng.randint(0, len(piece))]
        pieces.append(piece)
    return "".join(pieces)


def _cuts(rng: random.Random, text: str) -> list[int]:
    """Where the streamed text ends at each step (sometimes at every character)."""
    if rng.random() < 0.1 and len(text) < 400:
        return list(range(1, len(text) + 1)) or [0]
    ends = {rng.randint(1, max(len(text), 1)) for _ in range(rng.randint(0, 12))}
    return sorted(e for e in ends | {len(text)} if e <= len(text))


def _cases(seed: int, count: int) -> list[tuple[str, list[int], bool]]:
    rng = random.Random(seed)
    cases = []
    for _ in range(count):
        text = _text(rng)
        cases.append((text, _cuts(rng, text), rng.random() < 0.5))
    return cases


@pytest.mark.parametrize("parser", sorted(TOOL_PARSERS))
def test_every_tool_parser_reads_any_text_the_same_whole_and_streamed(parser):
    for text, cuts, _ in _cases(seed=1234, count=1500):
        assert_agrees(text, cuts, parser)


@pytest.mark.parametrize("reasoning", sorted(REASONING_PARSERS))
def test_reasoning_then_tool_parsers_read_any_text_the_same_whole_and_streamed(reasoning):
    parsers = sorted(TOOL_PARSERS)
    for k, (text, cuts, prompt_thinks) in enumerate(_cases(seed=4321, count=1500)):
        assert_agrees(text, cuts, parsers[k % len(parsers)], reasoning, prompt_thinks)
