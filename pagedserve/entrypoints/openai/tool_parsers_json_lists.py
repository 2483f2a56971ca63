"""Tool-call formats that are a JSON list of ``{"name", "arguments"}`` objects behind a marker.

- ``phi4_mini_json`` (Phi-4-mini-instruct): ``functools[{"name": ..., "arguments": {...}},
  ...]`` after optional content (``parameters`` is read where ``arguments`` is missing).
- ``xlam`` (Salesforce's xLAM, Llama and Qwen based): the answer is a JSON list of calls (or
  one after ``</think>``), or the list stands in a ```` ```json ```` fence, after
  ``[TOOL_CALLS]`` (to the end of its line) or in a ``<tool_call>`` block; the text around it is
  content. Items that are not ``{"name", "arguments"}`` objects are left out, as vLLM does.

As in vLLM, only the first list that reads as calls is taken. Unlike vLLM, whose phi4_mini_json
stops the list at its first ``]``, a list is read as JSON (so arguments may hold lists), and the
content is the text before (and for xlam after) the calls as written, not stripped.
"""

from __future__ import annotations

import json
from typing import Any

from pagedserve.entrypoints.openai.tool_parser_base import Call, ToolParser, held_back, unblanked


class Phi4MiniJsonParser(ToolParser):
    MARKER = "functools["

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        start = text.find(self.MARKER)
        if start < 0:
            if final:
                return text, []
            return unblanked(text[: len(text) - held_back(text, self.MARKER)]), []
        calls = self._calls(text[start + len(self.MARKER) - 1 :])
        if calls:  # read as soon as the list is whole
            return unblanked(text[:start]), calls
        return (text, []) if final else (unblanked(text[:start]), [])

    @staticmethod
    def _calls(body: str) -> list[Call]:
        try:
            decoded, _ = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            return []
        calls = []
        for obj in decoded:
            if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
                return []
            arguments = obj["arguments"] if "arguments" in obj else obj.get("parameters")
            if not isinstance(arguments, dict):
                return []
            calls.append((obj["name"], json.dumps(arguments, ensure_ascii=False)))
        return calls


_WAIT = None  # a block that may still become calls


class XlamParser(ToolParser):
    THINK_END, FENCE, TAG = "</think>", "```", "[TOOL_CALLS]"
    START, END = "<tool_call>", "</tool_call>"

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        bare = self._bare_starts(text)
        pos = 0
        while True:
            starts = [text.find(m, pos) for m in (self.FENCE, self.TAG, self.START)]
            starts += [b for b in bare if b >= pos]
            starts = [s for s in starts if s >= 0]
            if not starts:
                if final:
                    return text, []
                hold = max(held_back(text, m) for m in (self.FENCE, self.TAG, self.START))
                return unblanked(text[: len(text) - hold]), []
            start = min(starts)
            found = self._block(text, start, final)
            if found is _WAIT:
                return unblanked(text[:start]), []
            end, calls = found
            if calls:
                return unblanked(text[:start] + text[end:]), calls
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
        inner = start + len(opener)
        rest = text[inner:]
        if label and rest.startswith(label):
            rest = rest[len(label) :]
        elif label and label.startswith(rest) and not final:
            return _WAIT
        body = rest.lstrip(" \t\r") if keep_end else rest.lstrip()
        if not body:
            return _WAIT if not final else (inner, [])
        if not body.startswith("["):
            return inner, []
        close = text.find(closer, len(text) - len(body))
        if close < 0:
            if not final:
                return _WAIT
            if not keep_end:
                return inner, []
            close = len(text)
        calls = self._calls(text[len(text) - len(body) : close])
        if keep_end:
            return close, calls
        return close + len(closer), calls

    @staticmethod
    def _calls(body: str) -> list[Call]:
        try:
            decoded: Any = json.loads(body)
        except json.JSONDecodeError:
            return []
        if not isinstance(decoded, list):
            return []
        calls = []
        for obj in decoded:
            if not isinstance(obj, dict) or not {"name", "arguments"} <= obj.keys():
                continue
            name, arguments = obj["name"], obj["arguments"]
            if isinstance(arguments, dict):
                arguments = json.dumps(arguments, ensure_ascii=False)
            if isinstance(name, str) and isinstance(arguments, str):
                calls.append((name, arguments))
        return calls
