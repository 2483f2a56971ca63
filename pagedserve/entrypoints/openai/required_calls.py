"""The calls of a ``tool_choice: "required"`` answer read while it is being written.

The answer is held to a JSON array of ``{"name": ..., "parameters": {...}}`` objects (see
:mod:`.tool_calls`). A call can go out as soon as its name is whole, and its arguments, the
``parameters`` value's text as written, can follow chunk by chunk: text the model has written
is never taken back, so the streamed pieces join up to the whole answer's arguments.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

_OPEN, _CLOSE = "[{", "]}"


@dataclass
class PartialCall:
    """One call of the array so far."""

    name: str | None = None  # None until its string is whole
    arguments_start: int | None = None  # where the parameters value starts in the text
    arguments_end: int | None = None  # where it ends, None while it is still being written

    def arguments(self, text: str) -> str:
        if self.arguments_start is None:
            return ""
        return text[self.arguments_start : self.arguments_end].rstrip()


class RequiredCallsReader:
    """Reads a ``required`` answer's calls as its text grows: in the array (depth 1) each object
    (depth 2) is a call, whose ``"name"`` string and ``"parameters"`` value are found by their
    keys, whatever the whitespace. Each :meth:`read` scans only the text added since the last
    (from the start of a string left unfinished), so a long answer costs linear time."""

    def __init__(self) -> None:
        self.calls: list[PartialCall] = []
        self._pos = 0  # where the next read goes on
        self._depth = 0
        self._key: str | None = None  # the current call's key whose value comes next
        self._after_colon = False

    def read(self, text: str) -> list[PartialCall]:
        """The calls of ``text``, the whole answer so far (each call's text extends the last)."""
        i, n = self._pos, len(text)
        while i < n:
            ch = text[i]
            if ch == '"':
                end = _string_end(text, i)
                if end is None:
                    break  # read again from here once the string is whole
                self._string(text, i, end)
                i = end
                continue
            self._char(ch, i)
            i += 1
        self._pos = i
        return self.calls

    def _string(self, text: str, start: int, end: int) -> None:
        if self._depth != 2 or not self.calls:
            return
        call = self.calls[-1]
        if not self._after_colon:
            self._key = json.loads(text[start:end])
        elif self._key == "name":
            call.name = json.loads(text[start:end])
        elif self._key == "parameters":
            call.arguments_start, call.arguments_end = start, end

    def _char(self, ch: str, i: int) -> None:
        reading_arguments = self._after_colon and self._key == "parameters"
        if ch in _OPEN:
            self._depth += 1
            if self._depth == 2:
                self.calls.append(PartialCall())
                self._key, self._after_colon = None, False
            elif self._depth == 3 and reading_arguments:
                self.calls[-1].arguments_start = i
        elif ch in _CLOSE:
            self._depth -= 1
            if self._depth == 2 and reading_arguments:
                self.calls[-1].arguments_end = i + 1
            elif self._depth == 1 and reading_arguments:
                self._end_scalar(i)
        elif self._depth != 2:
            return
        elif ch == ":":
            self._after_colon = True
        elif ch == ",":
            if reading_arguments:
                self._end_scalar(i)
            self._key, self._after_colon = None, False
        elif reading_arguments and not ch.isspace() and self.calls[-1].arguments_start is None:
            self.calls[-1].arguments_start = i  # a number, true, false or null

    def _end_scalar(self, at: int) -> None:
        """A scalar parameters value ends where its object's next ``,`` or ``}`` is."""
        call = self.calls[-1]
        if call.arguments_end is None:
            call.arguments_end = at


def _string_end(text: str, start: int) -> int | None:
    """The index just past the JSON string that opens at ``start``; None if it is unfinished."""
    i = start + 1
    while i < len(text):
        if text[i] == "\\":
            i += 2
        elif text[i] == '"':
            return i + 1
        else:
            i += 1
    return None
