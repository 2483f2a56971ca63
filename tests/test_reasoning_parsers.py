"""Reasoning parsers: a reasoning model's <think> text split from its answer, whole or streamed."""

from __future__ import annotations

import pytest

from pagedserve.reasoning_parsers import REASONING_PARSERS

R1 = REASONING_PARSERS["deepseek_r1"]
QWEN3 = REASONING_PARSERS["qwen3"]
HELD_BY_GRAMMAR = R1.held_by_grammar()  # an answer a grammar holds from its first token


@pytest.mark.parametrize(
    ("parser", "text", "expected"),
    [
        (R1, "<think>a b</think>answer", ("a b", "answer")),
        (R1, "a b</think>\n\nanswer", ("a b", "\n\nanswer")),  # the template opened <think>
        (R1, "still thinking", ("still thinking", "")),  # cut before </think>
        (R1, "\n<think>x</think>", ("x", "")),
        (QWEN3, "<think>a</think>b", ("a", "b")),
        (QWEN3, "no thinking here", ("", "no thinking here")),
        (QWEN3, "plan</think>answer", ("", "plan</think>answer")),  # the prompt did not open it
        (HELD_BY_GRAMMAR, "<think>a</think>b", ("a", "b")),
        (HELD_BY_GRAMMAR, '{"tag": "</think>"}', ("", '{"tag": "</think>"}')),  # a JSON string
    ],
)
def test_whole_answers(parser, text, expected):
    assert parser.split(text, final=True) == expected


@pytest.mark.parametrize("parser", [R1, QWEN3])
def test_streamed_pieces_add_up_and_hold_back_partial_tags(parser):
    text = "<think>step one, step two</think>The answer."
    reasoning_sent = content_sent = ""
    for end in range(1, len(text) + 1):
        reasoning, content = parser.split(text[:end], final=end == len(text))
        # what was sent is never taken back: each split extends the last
        assert reasoning.startswith(reasoning_sent) and content.startswith(content_sent)
        assert "<" not in reasoning and "<" not in content
        reasoning_sent, content_sent = reasoning, content
    assert (reasoning_sent, content_sent) == ("step one, step two", "The answer.")


def test_qwen3_thinks_from_the_first_token_after_a_prompt_that_opened_think():
    """Qwen3-2507's template ends the prompt with <think>: the answer closes it unseen."""
    assert QWEN3.split("plan</think>answer", final=True, prompt_thinks=True) == ("plan", "answer")
    assert QWEN3.split("cut short", final=True, prompt_thinks=True) == ("cut short", "")
    assert QWEN3.split("plan</th", final=False, prompt_thinks=True) == ("plan", "")
    # a grammar's answer thinks only where it opens <think>, whatever the prompt opened
    held = '{"a": "x</think>y"}'
    assert HELD_BY_GRAMMAR.split(held, final=True, prompt_thinks=True) == ("", held)


def streamed(parser, text: str, prompt_thinks: bool) -> tuple[str, str]:
    """What a client receives of ``text`` streamed a character at a time: each split's new
    reasoning and content, added up."""
    reasoning = content = ""
    for end in range(1, len(text) + 1):
        r, c = parser.split(text[:end], final=end == len(text), prompt_thinks=prompt_thinks)
        reasoning += r[len(reasoning) :] if r.startswith(reasoning) else "<taken back>"
        content += c[len(content) :] if c.startswith(content) else "<taken back>"
    return reasoning, content


@pytest.mark.parametrize("parser", [R1, QWEN3, HELD_BY_GRAMMAR])
@pytest.mark.parametrize("prompt_thinks", [False, True])
@pytest.mark.parametrize(
    "text",
    ["plan</think>answer", "<think>a</think>b", " \n<think>a</think>b", "no tags at all",
     "a</think>b<think>c</think>d", "cut inside </thi"],
)  # fmt: skip
def test_streamed_answers_split_as_whole_ones(parser, prompt_thinks, text):
    """The same text gives the same reasoning and content, streamed or whole: an answer that
    never opened <think> but closed one streamed its thinking as content."""
    whole = parser.split(text, final=True, prompt_thinks=prompt_thinks)
    assert streamed(parser, text, prompt_thinks) == whole


def test_qwen3_without_thinking_streams_content_at_once():
    assert QWEN3.split("Hel", final=False) == ("", "Hel")
    assert QWEN3.split("<th", final=False) == ("", "")  # may still open with <think>
