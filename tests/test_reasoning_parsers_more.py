"""The reasoning parsers with markers other than Qwen's and DeepSeek's ``<think>``: Granite 3.2's
text markers (``granite``), Magistral's ``[THINK]`` (``mistral``), and OLMo 3 (``olmo3``); whole,
and streamed with the text split at every position (a marker split across two deltas)."""

from __future__ import annotations

import re

import pytest

from pagedserve.entrypoints.cli import build_parser
from pagedserve.reasoning_parsers import REASONING_PARSERS, Thinking
from pagedserve.sample.thinking_budget import (
    ThinkingMarkers,
    ThinkingTracker,
    count_reasoning_tokens,
)

GRANITE = REASONING_PARSERS["granite"]
MISTRAL = REASONING_PARSERS["mistral"]
OLMO3 = REASONING_PARSERS["olmo3"]

THOUGHT, RESPONSE = "Here is my thought process:", "Here is my response:"


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        (GRANITE, f"{THOUGHT}\nAdd them.\n\n{RESPONSE}\n4", ("\nAdd them.\n\n", "\n4")),
        (GRANITE, "Here's my thought process: a Here's my response: b", (" a ", " b")),
        (GRANITE, f"{THOUGHT} a Here's my response: b", (" a ", " b")),  # spellings mixed
        (GRANITE, f"\n{THOUGHT}a{RESPONSE}b", ("a", "b")),
        (GRANITE, f"{THOUGHT} cut short", (" cut short", "")),
        (GRANITE, "Just 4.", ("", "Just 4.")),  # thinking off: no markers
        (GRANITE, f"Well. {THOUGHT} a {RESPONSE} b", ("", f"Well. {THOUGHT} a {RESPONSE} b")),
        (GRANITE, f"a {RESPONSE} b", ("", f"a {RESPONSE} b")),  # never opened its thinking
        (MISTRAL, "[THINK]2+2[/THINK]4", ("2+2", "4")),
        (MISTRAL, "[THINK]still", ("still", "")),
        (MISTRAL, "4", ("", "4")),
        (MISTRAL, "<think>a</think>b", ("", "<think>a</think>b")),
        (MISTRAL, "[THINK]plan[TOOL_CALLS]get[ARGS]{}", ("plan", "[TOOL_CALLS]get[ARGS]{}")),
        (MISTRAL, "[THINK]a[/THINK]b[TOOL_CALLS]c", ("a", "b[TOOL_CALLS]c")),
        (OLMO3, "<think>a</think>b", ("a", "b")),
        (OLMO3, "a</think>b", ("a", "b")),  # its template opened <think>
        (OLMO3, "no end yet", ("no end yet", "")),
    ],
)
def test_whole_answers(parser, text, expected):
    assert parser.split(text, final=True) == expected


def _sent(parser, pieces: list[str]) -> tuple[str, str]:
    """What a client receives of an answer streamed in ``pieces``: each split's new reasoning
    and content, added up; what was sent is never taken back."""
    reasoning = content = text = ""
    for k, piece in enumerate(pieces):
        text += piece
        r, c = parser.split(text, final=k == len(pieces) - 1)
        assert r.startswith(reasoning) and c.startswith(content), (pieces, r, c)
        reasoning, content = r, c
    return reasoning, content


CASES = [
    (GRANITE, f"{THOUGHT}\nAdd them: 2 and 2. Here it is.\n{RESPONSE}\nHere is 4."),
    (GRANITE, "Here's my thought process: a Here's my response: b"),
    (GRANITE, "Here is what I think: 4."),  # opens like the marker, then is not it
    (GRANITE, f"{THOUGHT} cut short, Here is my resp"),
    (MISTRAL, "[THINK]2+2 is [not 5][/THINK]4 [ok]"),
    (MISTRAL, "[THIS] is no thinking"),
    (MISTRAL, "[THINK]plan [T][TOOL_CALLS]get[ARGS]{}"),  # a call written while thinking
    (OLMO3, "<think>a < b</think>so b"),
    (OLMO3, "a</thin"),
]


@pytest.mark.parametrize(("parser", "text"), CASES)
def test_streamed_split_at_every_position_adds_up_to_the_whole(parser, text):
    whole = parser.split(text, final=True)
    for cut in range(1, len(text)):
        assert _sent(parser, [text[:cut], text[cut:]]) == whole, cut
    assert _sent(parser, list(text)) == whole


@pytest.mark.parametrize(("parser", "text"), CASES)
def test_no_part_of_an_end_marker_is_sent_as_reasoning(parser, text):
    """While streaming, an end marker's first characters are held back until they are
    decided (they may be the marker, or reasoning)."""
    for end in range(1, len(text)):
        reasoning, _ = parser.split(text[:end], final=False)
        for marker in parser.ends:
            assert not any(reasoning.endswith(marker[:k]) for k in range(1, len(marker)))


def test_granite_holds_an_opening_that_may_be_its_marker():
    assert GRANITE.split("Here is my", final=False) == ("", "")
    assert GRANITE.split("Here is my answer", final=False) == ("", "Here is my answer")
    assert GRANITE.split(f"{THOUGHT} a Here is my re", final=False) == (" a ", "")


def test_thinking_a_grammar_holds_opens_with_its_marker():
    held = OLMO3.held_by_grammar()
    assert held.split('{"a": "x</think>y"}', final=True, prompt_thinks=True)[0] == ""
    granite = GRANITE.held_by_grammar()
    assert granite.split(f"{THOUGHT}a{RESPONSE}b", final=True) == ("a", "b")


def test_only_mistral_needs_the_special_tokens_kept():
    assert MISTRAL.keeps_special_tokens
    assert MISTRAL.special_tokens == {"[THINK]", "[/THINK]", "[TOOL_CALLS]"}
    assert MISTRAL.held_by_grammar().special_tokens == MISTRAL.special_tokens
    assert not any(p.keeps_special_tokens or p.special_tokens for p in (GRANITE, OLMO3))


@pytest.mark.parametrize(
    ("flag", "names"),
    [
        ("--reasoning-parser", ["granite", "mistral", "olmo3"]),
        (
            "--tool-call-parser",
            ["granite", "granite4", "granite-20b-fc", "llama4_json", "llama4_pythonic"],
        ),
        ("--tool-call-parser", ["deepseek_v3", "olmo3", "qwen3_json"]),
    ],
)
def test_serve_lists_vllm_s_parser_names(flag, names, capsys):
    """vLLM's names, in ``serve --help`` and in the error for a name it does not know."""
    serve = build_parser(["serve"])
    with pytest.raises(SystemExit):
        serve.parse_args(["serve", "--help"])
    usage = capsys.readouterr().out
    with pytest.raises(SystemExit):
        serve.parse_args(["serve", "model", flag, "nope"])
    error = capsys.readouterr().err
    assert "invalid choice: 'nope'" in error
    for name in names:
        assert f"'{name}'" in error and re.search(rf"{flag} \{{[^}}]*\b{name}\b", usage)


THINK, THINK_END, TOOL_CALLS = (1,), (2,), (3,)  # Magistral's markers, single special tokens
MAGISTRAL = ThinkingMarkers(THINK, THINK_END, from_start=False, content_opens=(TOOL_CALLS,))


def test_a_call_written_while_thinking_ends_it_in_tokens_too():
    """[TOOL_CALLS] ends Magistral's thinking: its tokens are no reasoning, and a budget does
    not force [/THINK] into the call."""
    assert count_reasoning_tokens(MAGISTRAL, [1, 7, 8, 3, 9], Thinking.OPENED) == 2
    assert count_reasoning_tokens(MAGISTRAL, [1, 7, 2, 3, 9], Thinking.OPENED) == 1
    tracker = ThinkingTracker(MAGISTRAL, 2, prompt_token_ids=[5])
    tracker.advance([1, 7, 3])
    assert tracker.forced_token() is None
    tracker.advance([1, 7, 3, 9, 9, 9])
    assert tracker.forced_token() is None
