"""``functiongemma``: the tool calls of Google's FunctionGemma (a Gemma 3 model).

Each call is ``<start_function_call>call:NAME{key:<escape>value<escape>,...}<end_function_call>``
after optional content. As vLLM reads it, each ``key:<escape>...<escape>`` is an argument whose
value is read as JSON where it is JSON (``2``, ``true``, ``[1, 2]``) and kept as a string where
not; a last call the answer ends inside is read to its end. The markers are special tokens, so
requests that may call keep them in their text. The content is the text before the
first call, as written (vLLM strips it).
"""

from __future__ import annotations

import re
from typing import Any

from pagedserve.entrypoints.openai.tool_parser_base import (
    Call,
    NotJson,
    ToolParser,
    dumps,
    held_back,
    loads,
)

START, END, ESCAPE = "<start_function_call>", "<end_function_call>", "<escape>"
_HEAD = re.compile(r"call:(\w+)\{")
_ARGUMENT = re.compile(r"(\w+):<escape>(.*?)<escape>", re.DOTALL)


def _arguments(body: str) -> str:
    arguments: dict[str, Any] = {}
    for key, value in _ARGUMENT.findall(body):
        try:
            arguments[key] = loads(value)
        except NotJson:
            arguments[key] = value
    return dumps(arguments)


class FunctionGemmaParser(ToolParser):
    special_tokens = frozenset((START, END, ESCAPE))

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        first = text.find(START)
        if first < 0:
            return (text if final else text[: len(text) - held_back(text, START)]), []
        calls = []
        start = first
        while start >= 0:
            head = _HEAD.match(text, start + len(START))
            if head is None:  # no call here; the search goes on
                start = text.find(START, start + len(START))
                continue
            end = text.find("}" + END, head.end())
            if end < 0:  # a call still being written, or the answer ended inside it
                if final:
                    calls.append((head[1], _arguments(text[head.end() :])))
                break
            calls.append((head[1], _arguments(text[head.end() : end])))
            start = text.find(START, end + 1 + len(END))
        if calls:
            return text[:first], calls
        return (text, []) if final else (text[:first], [])
