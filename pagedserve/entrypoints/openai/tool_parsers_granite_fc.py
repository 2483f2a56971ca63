"""``granite-20b-fc``: the tool calls of IBM's granite-20b-functioncalling.

Each call is ``<function_call>`` then a JSON object ``{"name": ..., "arguments": {...}}``
(``arguments`` may be left out), one after another; the content is the text before the first
call, and the text after each call's JSON is dropped, as vLLM reads it. A call goes out as soon
as its JSON is whole. As in vLLM, an answer whose first call is no call (not JSON, no name, or
cut short) is all text; after calls, which a stream has sent by then, such a call is left out,
where vLLM would take the whole answer back as text. Unlike vLLM, whose stream reads calls only
in an answer that opens with ``<function_call>`` (and reads a call's JSON only up to the next
``<function_call>``, even inside a string), calls after content stream as they do whole, and a
call's JSON is read to its own end. The marker is text, not a special token.
"""

from __future__ import annotations

import re

from pagedserve.entrypoints.openai.tool_parser_base import (
    Call,
    NotJson,
    ToolParser,
    call_of,
    held_back,
    raw_decode,
)

MARKER = "<function_call>"
_SPACE = re.compile(r"\s*")  # as str.lstrip() strips, read in place (no copy of the rest)


class Granite20bFcParser(ToolParser):
    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        first = text.find(MARKER)
        if first < 0:
            return (text if final else text[: len(text) - held_back(text, MARKER)]), []
        calls: list[Call] = []
        start = first
        while start >= 0:
            after = start + len(MARKER)
            try:
                obj, end = raw_decode(text, _SPACE.match(text, after).end())
            except NotJson:  # not JSON, or not yet: read once the answer is whole
                if not final:
                    break
                obj, end = None, after
            call = call_of(obj, "arguments")
            if call is None and not calls:
                return (text, []) if final else (text[:first], [])  # no call first: all text
            if call is not None:
                calls.append(call)
            start = text.find(MARKER, end)
        return text[:first], calls
