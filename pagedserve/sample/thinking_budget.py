"""A reasoning model's thinking, followed token by token and held to a budget (vLLM's
``thinking_token_budget``); and counted once the answer is whole
(``completion_tokens_details.reasoning_tokens``).

A reasoning model thinks between its parser's markers (``<think>`` ... ``</think>``). A sequence
thinks from the start of its answer when its prompt ends inside an open thinking section (a
template that opens ``<think>`` itself, as DeepSeek-R1's and Qwen3's with thinking on do; the
thinking tokens in the prompt count against the budget, as in vLLM), or when its parser's
template always opens one (``deepseek_r1``) and the prompt did not close it. Otherwise it thinks
from the start marker it writes. An answer that a grammar holds from its first token (structured
outputs, forced tool calls) thinks only where it opens with the start marker: a JSON schema's
text is no thinking, whatever the template opened or a JSON string holds, as the server splits
it. With a budget of N, once a section holds N tokens the end marker is forced, token by token
(a marker the model has begun is finished, not restarted), and the model answers; a section that
starts again gets the budget again.

The count is of the tokens that the answer's reasoning holds, as the reasoning parser split its
text: its first thinking section only, markers excluded (a later section is content, and so are
its tokens).

Markers are matched as token sequences: exact for the reasoning models whose markers are single
added tokens (Qwen3, QwQ, DeepSeek-R1 and its distills, Magistral); for markers written as plain
text (OLMo 3's ``</think>``, Granite's ``Here is my response:``) only where the model tokenizes
them as they tokenize alone, and only in their first spelling.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from pagedserve.reasoning_parsers import REASONING_PARSERS, ReasoningParser, Thinking


@dataclass(frozen=True)
class ThinkingMarkers:
    """A parser's thinking markers in token ids, and whether its template opens thinking."""

    start: tuple[int, ...]
    end: tuple[int, ...]
    from_start: bool
    content_opens: tuple[tuple[int, ...], ...] = ()  # they end thinking too (the content's)

    @classmethod
    def of(cls, parser: ReasoningParser, tokenizer: Any) -> ThinkingMarkers:
        def ids(text: str) -> tuple[int, ...]:
            return tuple(tokenizer.encode(text, add_special_tokens=False))

        opens = tuple(ids(marker) for marker in parser.content_opens)
        return cls(ids(parser.starts[0]), ids(parser.ends[0]), parser.thinks_from_start, opens)

    def open_at_end(self, prompt_token_ids: list[int]) -> bool:
        """Whether a prompt ends inside an open thinking section (a template that opened
        ``<think>`` for the answer)."""
        return _last(prompt_token_ids, self.start) > _last(prompt_token_ids, self.end)


def _first(tokens: list[int], marker: tuple[int, ...], begin: int = 0) -> int:
    """Where the first occurrence of ``marker`` in ``tokens[begin:]`` starts (-1 if none)."""
    n = len(marker)
    for start in range(begin, len(tokens) - n + 1):
        if tuple(tokens[start : start + n]) == marker:
            return start
    return -1


def _last(tokens: list[int], marker: tuple[int, ...]) -> int:
    """Where the last occurrence of ``marker`` in ``tokens`` ends (-1 if none)."""
    n = len(marker)
    for end in range(len(tokens), n - 1, -1):
        if tuple(tokens[end - n : end]) == marker:
            return end
    return -1


class ThinkingTracker:
    """One sequence's thinking: fed its answer's tokens as they come (:meth:`advance`), it says
    which token a budget forces next (:meth:`forced_token`)."""

    def __init__(
        self,
        markers: ThinkingMarkers,
        budget: int | None,
        prompt_token_ids: list[int],
        constrained: bool = False,
    ) -> None:
        """``constrained``: a grammar holds the answer from its first token (it thinks only
        where it opens with the start marker)."""
        self.markers = markers
        self.constrained = constrained
        self.budget = budget
        self._seen = 0  # answer tokens fed so far
        self._tail: list[int] = []  # the last tokens, as long as the longer marker
        self._keep = max(len(m) for m in (markers.start, markers.end, *markers.content_opens))
        opened = _last(prompt_token_ids, markers.start)
        if constrained:
            self.thinking, self.spent = False, 0
        elif opened > _last(prompt_token_ids, markers.end):
            self.thinking, self.spent = True, len(prompt_token_ids) - opened
        else:
            self.thinking, self.spent = markers.from_start, 0

    def advance(self, output_token_ids: list[int]) -> None:
        """Take the answer's tokens that came since the last call."""
        start, end = self.markers.start, self.markers.end
        for token in output_token_ids[self._seen :]:
            self._seen += 1
            self._tail = [*self._tail, token][-self._keep :]
            if self.thinking:
                self.spent += 1
            if self._ends_with(end) or any(map(self._ends_with, self.markers.content_opens)):
                self.thinking, self.spent = False, 0
            elif self._ends_with(start) and (not self.constrained or self._seen == len(start)):
                self.thinking, self.spent = True, 0

    def forced_token(self) -> int | None:
        """The token the budget forces next: the end marker's next token once a section has
        thought its budget; None otherwise."""
        if self.budget is None or not self.thinking or self.spent < self.budget:
            return None
        end = self.markers.end
        begun = next(
            (k for k in range(len(end) - 1, 0, -1) if self._ends_with(end[:k])),
            0,
        )
        return end[begun]

    def _ends_with(self, marker: tuple[int, ...]) -> bool:
        return len(self._tail) >= len(marker) and tuple(self._tail[-len(marker) :]) == marker

    def copy(self) -> ThinkingTracker:
        """An independent tracker in the same state (a sequence forked from this one)."""
        return copy.copy(self)


def thinking_markers(parser_name: str | None, tokenizer: Any) -> ThinkingMarkers | None:
    """The markers of the reasoning parser named (``--reasoning-parser``), or None."""
    if parser_name is None:
        return None
    if parser_name not in REASONING_PARSERS:
        raise ValueError(
            f"reasoning_parser {parser_name!r} is not one of {sorted(REASONING_PARSERS)}"
        )
    return ThinkingMarkers.of(REASONING_PARSERS[parser_name], tokenizer)


def thinking_tracker(
    markers: ThinkingMarkers | None, params: Any, prompt_token_ids: list[int]
) -> ThinkingTracker | None:
    """The tracker of a request's ``thinking_token_budget``, or None if it sets none; a budget
    needs the engine to know the model's markers (a reasoning parser)."""
    if params.thinking_token_budget is None:
        return None
    if markers is None:
        raise ValueError(
            "thinking_token_budget needs a reasoning parser to find the model's thinking: "
            "start the engine with --reasoning-parser (LLM(..., reasoning_parser=...))"
        )
    constrained = params.structured_outputs is not None
    return ThinkingTracker(markers, params.thinking_token_budget, prompt_token_ids, constrained)


def count_reasoning_tokens(
    markers: ThinkingMarkers, output_token_ids: list[int], thinking: Thinking
) -> int:
    """The answer's tokens that its reasoning holds, as the reasoning parser split its text
    (``thinking``, :meth:`ReasoningParser.thinking` of the whole answer): from its first token,
    or after the start marker it opened with, up to its first end marker or marker that opens
    the content (or its end)."""
    if thinking is Thinking.NONE:
        return 0
    begin = 0
    if thinking is Thinking.OPENED:
        opened = _first(output_token_ids, markers.start)
        begin = opened + len(markers.start) if opened >= 0 else 0
    ends = [_first(output_token_ids, m, begin) for m in (markers.end, *markers.content_opens)]
    ends = [end for end in ends if end >= 0]
    return (min(ends) if ends else len(output_token_ids)) - begin
