"""Tool-call formats that are a JSON list of ``{"name", "arguments"}`` objects behind a marker.

- ``phi4_mini_json`` (Phi-4-mini-instruct): ``functools[{"name": ..., "arguments": {...}},
  ...]`` after optional content (``parameters`` is read where ``arguments`` is missing).

As in vLLM, only the first list that reads as calls is taken. Unlike vLLM, whose phi4_mini_json
stops the list at its first ``]``, a list is read as JSON (so arguments may hold lists), and the
content is the text before the calls as written, not stripped.
"""

from __future__ import annotations

import json

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
