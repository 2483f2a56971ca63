"""What every tool-call parser shares: the :class:`ToolParser` contract and small readers."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import Any

Call = tuple[str, str]  # (function name, arguments as a JSON text)


class ToolParser:
    """Splits generated text into ``(content, calls)``; one parser per answer."""

    # The special tokens that mark the calls, which the text must keep to be read (and, as
    # vLLM's parsers keep theirs, the only special tokens it keeps: see SamplingParams).
    special_tokens: frozenset[str] = frozenset()
    # Ids of the calls it reads (None: the server's own); see mistral.
    new_call_id: Callable[[], str] | None = None

    def __init__(self, tools: list[dict[str, Any]] | None = None) -> None:
        self.tools = tools or []  # the request's tools, for formats typed by their schemas

    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        """The content and the complete calls in ``text``. While not ``final``, both only grow
        from one call to the next as ``text`` grows. The content is the text as written,
        whitespace and all: what of it is shown beside calls is the server's rule (see
        :mod:`.tool_parsers`)."""
        raise NotImplementedError


class NotJson(ValueError):
    """Text that is no JSON a call's arguments can carry."""


def _refuse_constant(name: str) -> Any:
    raise NotJson(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):
        raise NotJson(f"{text} is past the range of a JSON number")
    return number


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float)
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def raw_decode(text: str, pos: int = 0) -> tuple[Any, int]:
    """The JSON value at ``pos`` in ``text`` and where it ends; :class:`NotJson` where there is
    none a model's answer may give back. Python's reader takes ``NaN`` and ``Infinity`` (which
    would go out as arguments no client can parse), reads ``1e999`` as infinity, and raises
    errors other than ``JSONDecodeError`` for an integer of over 4300 digits (``ValueError``)
    or nesting too deep (``RecursionError``): a parser meets whatever a model writes. It also
    takes a lone surrogate escape (``"\\ud83c"``), a string no UTF-8 answer can carry."""
    try:
        value, end = _DECODER.raw_decode(text, pos)
    except (ValueError, RecursionError) as exc:
        raise NotJson(str(exc)) from None
    if _SURROGATE_ESCAPE.search(text, pos, end):
        dumps(value)  # NotJson for a lone surrogate
    return value, end


def loads(text: str) -> Any:
    """``text`` read as one JSON value (whitespace around it allowed), as :func:`raw_decode`."""
    value, end = raw_decode(text, len(text) - len(text.lstrip()))
    if text[end:].strip():
        raise NotJson("extra data after the JSON value")
    return value


def dumps(value: Any) -> str:
    """Arguments as the JSON text a call carries; ``ValueError`` for a value JSON has not (NaN,
    infinities) and :class:`NotJson` for a string UTF-8 has not (a lone surrogate, which would
    fail the answer's encoding)."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise NotJson("a lone surrogate is not text") from None
    return text


def arguments_text(arguments: Any) -> str | None:
    """The JSON text of a call's decoded ``arguments``: an object, or a string that holds one
    (kept as written); None for anything else, which no client could read as arguments."""
    if isinstance(arguments, dict):
        return dumps(arguments)
    if not isinstance(arguments, str):
        return None
    try:
        decoded = loads(arguments)
    except NotJson:
        return None
    return arguments if isinstance(decoded, dict) else None


def call_of(obj: Any, arguments_key: str) -> Call | None:
    """``(name, arguments JSON)`` of a decoded call object, None if it is not one."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, {})
    if not isinstance(arguments, dict):
        return None
    return obj["name"], dumps(arguments)


def held_back(text: str, marker: str) -> int:
    """How many characters at the end of ``text`` could be the start of ``marker``."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0
