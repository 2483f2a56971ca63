"""``deepseek_v3``: the tool calls of DeepSeek-V3 and DeepSeek-R1 (and R1's Qwen and Llama
distills), as their chat templates write them::

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    {ARGS}
    ```<｜tool▁call▁end｜>...<｜tool▁calls▁end｜>

(the bars are fullwidth, the spaces ``▁``). The markers are added tokens of DeepSeek's
tokenizers, kept in the answer's text.

The content is the text before ``<｜tool▁calls▁begin｜>``; an answer without it is all
content, even with call blocks in it, as vLLM reads it. After it, each block from
``<｜tool▁call▁begin｜>`` to the next ``<｜tool▁call▁end｜>`` (even one inside a string) is a
call, which goes out once that end marker is written; blocks after ``<｜tool▁calls▁end｜>`` are
read too, as vLLM reads them, and the text between and after them is dropped, as vLLM drops
it. A block that is no call (another type than ``function``, no name, arguments that are no
JSON object, no fences, or a block that never ends) is left out, as vLLM's reading leaves out
what does not match its pattern; an answer with no call at all is all text.

Where vLLM differs: with ``<｜tool▁calls▁begin｜>`` but no call it gives the text before it as
content, dropping the rest, where we keep the whole answer as text so nothing written is lost.
It reads the arguments as one line, passing on whatever that line holds, JSON or not; we read
them as JSON (over lines, as a model may indent them), with whitespace allowed around them and
the fences, and pass on the object they hold. A block whose type is not ``function`` makes
vLLM's answer all text; we leave that block out. Its stream reads a block's markers by token
id, so a marker written as plain text is missed; we read the text.
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
    raw_decode,
)

CALLS_BEGIN, CALLS_END = "<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"
CALL_BEGIN, CALL_END, SEP = "<｜tool▁call▁begin｜>", "<｜tool▁call▁end｜>", "<｜tool▁sep｜>"
# function<｜tool▁sep｜>NAME (no marker in it), then the opening fence; the arguments follow.
_HEAD = re.compile(rf"function{SEP}([^\n｜]*[^\s｜][^\n｜]*)\n```json\s*")
_TAIL = re.compile(r"\s*```\s*")


class DeepSeekV3Parser(ToolParser):
    special_tokens = frozenset((CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP))

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        # The text only grows, so a closed block is read once: where the calls begin, where
        # to look for the next block, and the calls read so far.
        self._begin = -1
        self._next = 0
        self._calls: list[Call] = []

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        begin = text.find(CALLS_BEGIN)
        if begin < 0:
            return (text if final else text[: len(text) - held_back(text, CALLS_BEGIN)]), []
        if begin != self._begin:
            self._begin, self._next, self._calls = begin, begin + len(CALLS_BEGIN), []
        self._read_closed_blocks(text)
        if self._calls or not final:
            return text[:begin], list(self._calls)
        return text, []  # no call: all text

    def _read_closed_blocks(self, text: str) -> None:
        while (start := text.find(CALL_BEGIN, self._next)) >= 0:
            end = text.find(CALL_END, start)
            if end < 0:
                return  # read once it ends
            call = _call(text[start + len(CALL_BEGIN) : end])
            if call is not None:
                self._calls.append(call)
            self._next = end + len(CALL_END)


def _call(body: str) -> Call | None:
    """The call of one block's text, None if it is none."""
    head = _HEAD.match(body)
    if head is None:
        return None
    try:
        arguments, end = raw_decode(body, head.end())
    except NotJson:
        return None
    if not isinstance(arguments, dict) or _TAIL.fullmatch(body, end) is None:
        return None
    return head.group(1), dumps(arguments)
