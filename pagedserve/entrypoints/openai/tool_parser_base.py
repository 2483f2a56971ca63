"""What every tool-call parser shares: the :class:`ToolParser` contract and small readers."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

Call = tuple[str, str]  # (function name, arguments as a JSON text)


class ToolParser:
    """Splits generated text into ``(content, calls)``; one parser per answer."""

    # The calls are marked by special tokens, which the text must keep to be read.
    keeps_special_tokens = False
    # Ids of the calls it reads (None: the server's own); see mistral.
    new_call_id: Callable[[], str] | None = None

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []  # the request's tools, for formats typed by their schemas

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        """The content and the complete calls in ``text``. While not ``final``, both only grow
        from one call to the next as ``text`` grows."""
        raise NotImplementedError


def call_of(obj: Any, arguments_key: str) -> Call | None:
    """``(name, arguments JSON)`` of a decoded call object, None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    return obj["name"], json.dumps(arguments, ensure_ascii=False)


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def unblanked(content: str) -> str:
    """``content``, or nothing when it is only whitespace: what the model wrote around its calls
    (a newline before them) is not content to stream."""
    return content if content.strip() else ""
