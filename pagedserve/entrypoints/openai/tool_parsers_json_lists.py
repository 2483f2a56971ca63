"""Tool-call formats that are a JSON list of ``{"name", "arguments"}`` objects behind a marker.

- ``phi4_mini_json`` (Phi-4-mini-instruct): ``functools[{"name": ..., "arguments": {...}},
  ...]`` after optional content (``parameters`` is read where ``arguments`` is missing).
- ``granite`` (IBM Granite 3.0 and 3.1): ``<|tool_call|>`` (3.0, a special token, so requests
  that may call keep it in their text) or ``<tool_call>`` (3.1), then a JSON list of
  ``{"name": ..., "arguments": {...}}`` (``arguments`` may be left out); the text before and
  after the list is content.
- ``xlam`` (Salesforce's xLAM, Llama and Qwen based): the answer is a JSON list of calls (or
  one after ``</think>``), or the list stands in a ```` ```json ```` fence, after
  ``[TOOL_CALLS]`` (to the end of its line) or in a ``<tool_call>`` block; the text around it is
  content. Items that are not ``{"name", "arguments"}`` objects are left out, as vLLM does.

As in vLLM, only the first list that reads as calls is taken. Unlike vLLM, whose phi4_mini_json
stops the list at its first ``]``, a list is read as JSON (so arguments may hold lists), and the
content is the text before (and for granite and xlam after) the calls as written, not stripped
(vLLM strips granite's).
"""

from __future__ import annotations

import re
from typing import Any

from pagedserve.entrypoints.openai.tool_parser_base import (
    Call,
    NotJson,
    ToolParser,
    arguments_text,
    dumps,
    held_back,
    loads,
    raw_decode,
)


class MarkedJsonListParser(ToolParser):
    """A JSON list of calls after the first of ``MARKERS`` in the answer (only whitespace
    between them), read as soon as the list is whole; the text before it is content, and
    where ``TAIL_IS_CONTENT`` the text after it too."""

    MARKERS: tuple[str, ...] = ()
    TAIL_IS_CONTENT = False
    ARGUMENTS_OPTIONAL = False  # a call without arguments takes none ({})

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        found = [(text.find(m), m) for m in self.MARKERS]
        found = [(at, m) for at, m in found if at >= 0]
        if not found:
            if final:
                return text, []
            hold = max(held_back(text, m) for m in self.MARKERS)
            return text[: len(text) - hold], []
        start, marker = min(found)
        after = start + len(marker)
        if marker.endswith("["):  # the marker opens the list itself
            after -= 1
        calls, end = self._calls(text, after + len(text[after:]) - len(text[after:].lstrip()))
        if calls:
            tail = text[end:] if self.TAIL_IS_CONTENT else ""
            return text[:start] + tail, calls
        return (text, []) if final else (text[:start], [])

    def _calls(self, text: str, pos: int) -> tuple[list[Call], int]:
        """The calls of the list at ``pos`` and where it ends; none if it is not (yet) one."""
        try:
            decoded, end = raw_decode(text, pos)
        except NotJson:
            return [], pos
        if not isinstance(decoded, list):
            return [], pos
        calls = []
        for obj in decoded:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return [], pos
            arguments = obj["arguments"] if "arguments" in obj else obj.get("parameters")
            if arguments is None and self.ARGUMENTS_OPTIONAL:
                arguments = {}
            if not isinstance(arguments, dict):
                return [], pos
            calls.append((obj["name"], dumps(arguments)))
        return calls, end


class Phi4MiniJsonParser(MarkedJsonListParser):
    MARKERS = ("functools[",)


class GraniteParser(MarkedJsonListParser):
    MARKERS = ("<|tool_call|>", "<tool_call>")  # Granite 3.0's special token, 3.1's text
    TAIL_IS_CONTENT = True
    ARGUMENTS_OPTIONAL = True
    special_tokens = frozenset(MARKERS)


_WAIT = None  # a block that may still become calls
_SPACE, _LINE_SPACE = re.compile(r"\s*"), re.compile(r"[ \t\r]*")  # as str.lstrip() strips


class XlamParser(ToolParser):
    THINK_END, FENCE, TAG = "</think>", "```", "[TOOL_CALLS]"
    START, END = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        bare = self._bare_starts(text)
        markers = (self.FENCE, self.TAG, self.START)
        ahead = [text.find(m) for m in markers]  # each marker's next place (-1: none left)
        pos = 0
        while True:
            # A marker is searched for again only once the search has passed it: many blocks
            # that are no calls (a model repeating a fence) are read in one pass.
            ahead = [
                text.find(m, pos) if 0 <= at < pos else at
                for m, at in zip(markers, ahead, strict=True)
            ]
            starts = [s for s in ahead + bare if s >= pos]
            if not starts:
                if final:
                    return text, []
                hold = max(held_back(text, m) for m in (self.FENCE, self.TAG, self.START))
                return text[: len(text) - hold], []
            start = min(starts)
            found = self._block(text, start, final)
            if found is _WAIT:
                return text[:start], []
            end, calls = found
            if calls:
                return text[:start] + text[end:], calls
            pos = end  # not calls: text, and the search goes on after it

    def _bare_starts(self, text: str) -> list[int]:
        """Where a bare list of calls may stand: opening the answer, or just after ``</think>``."""
        starts = [len(text) - len(text.lstrip())]
        think = text.find(self.THINK_END)
        if think >= 0:
            after = think + len(self.THINK_END)
            starts.append(after + len(text[after:]) - len(text[after:].lstrip()))
        return [s for s in starts if text.startswith("[", s)]

    def _block(self, text: str, start: int, final: bool) -> tuple[int, list[Call]] | None:
        """``(end, calls)`` of the block at ``start`` (no calls: it is text up to ``end``, to
        be searched on from there), or ``_WAIT``."""
        if text.startswith(self.FENCE, start):
            return self._delimited(text, start, self.FENCE, self.FENCE, final, "json")
        if text.startswith(self.TAG, start):
            return self._delimited(text, start, self.TAG, "\n", final, "", keep_end=True)
        if text.startswith(self.START, start):
            return self._delimited(text, start, self.START, self.END, final)
        if not final:  # a bare list, read once the answer is whole
            return _WAIT
        calls = self._calls(text[start:])
        return (len(text), calls) if calls else (start + 1, [])

    def _delimited(
        self,
        text: str,
        start: int,
        opener: str,
        closer: str,
        final: bool,
        label: str = "",
        keep_end: bool = False,
    ) -> tuple[int, list[Call]] | None:
        """A list between ``opener`` (then an optional ``label``) and ``closer`` (or the end of
        the answer where ``keep_end``: the closer, a newline, is left to the content)."""
        inner = after = start + len(opener)  # read by position, never copying the rest
        if label and text.startswith(label, inner):
            after += len(label)
        elif label and len(text) - inner < len(label) and label.startswith(text[inner:]):
            if not final:
                return _WAIT
        body = (_LINE_SPACE if keep_end else _SPACE).match(text, after).end()
        if body == len(text):
            return _WAIT if not final else (inner, [])
        if not text.startswith("[", body):
            return inner, []
        close = text.find(closer, body)
        if close < 0:
            if not final:
                return _WAIT
            if not keep_end:
                return inner, []
            close = len(text)
        calls = self._calls(text[body:close])
        if keep_end:
            return close, calls
        return close + len(closer), calls

    @staticmethod
    def _calls(body: str) -> list[Call]:
        try:
            decoded: Any = loads(body)
        except NotJson:
            return []
        if not isinstance(decoded, list):
            return []
        calls = []
        for obj in decoded:
            if not isinstance(obj, dict) or not {"name", "arguments"} <= obj.keys():
                continue
            name, arguments = obj["name"], arguments_text(obj["arguments"])
            if isinstance(name, str) and arguments is not None:
                calls.append((name, arguments))
        return calls
