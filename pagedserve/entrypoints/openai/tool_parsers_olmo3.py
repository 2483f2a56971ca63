"""``olmo3``: the tool calls of AI2's OLMo 3.

OLMo 3's chat template writes an assistant's calls as ``<function_calls>``, then one Python
call per line, ``get_weather(city="Paris", days=2)``, then ``</function_calls>``. A call is read
as ``pythonic`` reads one (keyword arguments, literals only, through ``ast``), with ``null``,
``true`` and ``false`` read as JSON's literals, as the model writes them.

The content is the text before ``<function_calls>``; the calls go out once the block closes (at
its first ``</function_calls>``, even one inside a string, as vLLM reads it) or, in an answer
that ends inside it, once the answer is whole. The text after the block, a second block
included, is dropped, as vLLM drops it. A block with a line that is no call (or with no line)
leaves the whole answer as text. The markers are read as text: vLLM keeps no special tokens for
them either.

Where vLLM differs: its whole answer also reads call lines without the block as calls (we do
not: ``f(x=1)`` may well be prose or code) and gives no content beside calls, while its stream
reads calls only in an answer that opens with the block (any other goes out as content, block
and all); we read the text before the block as content, whole and streamed. It joins the lines
with commas before reading them, so a string spanning lines is read changed; we read each line
alone, and such a line is no call.
"""

from __future__ import annotations

from typing import Any

from pagedserve.entrypoints.openai.tool_parser_base import Call, ToolParser, held_back
from pagedserve.entrypoints.openai.tool_parsers_pythonic import call_of_node, parsed

START, END = "<function_calls>", "</function_calls>"


class Olmo3Parser(ToolParser):
    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        super().__init__(tools)
        self._read: tuple[int, int, list[Call]] | None = None  # the block read last, its calls

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        start = text.find(START)
        if start < 0:
            return (text if final else text[: len(text) - held_back(text, START)]), []
        end = text.find(END, start + len(START))
        if end < 0 and not final:
            return text[:start], []  # read once the block closes
        end = end if end >= 0 else len(text)
        if self._read is None or self._read[:2] != (start, end):  # the text only grows
            self._read = start, end, _calls(text[start + len(START) : end])
        calls = self._read[2]
        if calls or not final:
            return text[:start], calls
        return text, []  # no calls in the block: all text


def _calls(block: str) -> list[Call]:
    """The calls of a block's lines, one per non-blank line; [] unless every line is one."""
    calls = []
    for line in block.splitlines():
        if not line.strip():
            continue
        call = call_of_node(parsed(line.strip()))
        if call is None:
            return []
        calls.append(call)
    return calls
