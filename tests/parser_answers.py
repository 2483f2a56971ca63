"""A chat answer read by the server's parsers whole and streamed, for the parser fuzz tests.

The stream is read as ``serving_chat`` reads it: each step splits the text so far with the
reasoning parser (if any), sends the reasoning past what it sent, and hands the content to
:class:`ToolCallDeltas`; the last step is the finished answer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas, final_answer
from pagedserve.reasoning_parsers import REASONING_PARSERS

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {
                "type": "object",
                "properties": {
                    "a": {"type": "integer"},
                    "n": {"type": "number"},
                    "o": {"type": "object"},
                    "b": {"type": "boolean"},
                },
            },
        },
    }
    for name in ("get", "time")
]


@dataclass
class Answer:
    reasoning: str = ""
    content: str = ""
    calls: list[tuple[str, str]] = field(default_factory=list)  # (name, arguments)
    finish_reason: str | None = None


def _ids():
    counter = itertools.count()
    return lambda: f"call-{next(counter)}"


def whole(
    text: str, tool_parser: str, reasoning_parser: str | None = None, prompt_thinks: bool = False
) -> Answer:
    """The answer the server gives for a finished ``text`` (``stream: false``);
    ``prompt_thinks``: its prompt ended inside an open thinking section."""
    reasoning = ""
    if reasoning_parser is not None:
        reasoning, text = REASONING_PARSERS[reasoning_parser].split(text, True, prompt_thinks)
    message, finish = final_answer(text, (AUTO, tool_parser), "stop", _ids(), TOOLS)
    calls = [
        (c["function"]["name"], c["function"]["arguments"]) for c in message.get("tool_calls", [])
    ]
    return Answer(reasoning, message["content"] or "", calls, finish)


def streamed(
    text: str,
    cuts: Sequence[int],
    tool_parser: str,
    reasoning_parser: str | None = None,
    prompt_thinks: bool = False,
) -> Answer:
    """The same answer streamed, its text growing to each of ``cuts`` (the last is its end)."""
    deltas = ToolCallDeltas((AUTO, tool_parser), _ids(), TOOLS)
    answer = Answer()
    for end in cuts:
        final = end == len(text)
        reasoning, content = "", text[:end]
        if reasoning_parser is not None:
            reasoning, content = REASONING_PARSERS[reasoning_parser].split(
                content, final, prompt_thinks
            )
        assert reasoning.startswith(answer.reasoning), "streamed reasoning was taken back"
        answer.reasoning = reasoning
        delta, answer.finish_reason = deltas.next("", content, "stop" if final else None)
        answer.content += delta.get("content", "")
        answer.calls += [
            (c["function"]["name"], c["function"]["arguments"]) for c in delta.get("tool_calls", [])
        ]
    return answer


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


def assert_agrees(
    text: str,
    cuts: Sequence[int],
    tool_parser: str,
    reasoning_parser: str | None = None,
    prompt_thinks: bool = False,
) -> None:
    """Read whole and streamed, the answer is the same (the streamed content deltas joined are
    the whole answer's content, null read as "", blank content beside calls included), and
    every call's arguments are a JSON object that any client can parse."""
    expected = whole(text, tool_parser, reasoning_parser, prompt_thinks)
    for _, arguments in expected.calls:
        assert isinstance(json.loads(arguments, parse_constant=_not_json), dict), arguments
    got = streamed(text, cuts, tool_parser, reasoning_parser, prompt_thinks)
    for part in (got.reasoning, got.content, *(a for _, a in got.calls)):
        part.encode()  # UTF-8, as the answer goes out
    assert got == expected, (text, cuts)
