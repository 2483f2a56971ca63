"""``qwen3_coder`` / ``qwen3_xml`` (the same parser in vLLM): Qwen3-Coder's XML tool calls.

A call is ``<function=NAME><parameter=KEY>VALUE</parameter>...</function>``, in a
``<tool_call>`` block or not, after optional content (the text before the first call; text
between and after calls is dropped, as vLLM drops it). One newline opening and one closing each
value is the template's markup. Values are text; as vLLM does, each is converted to the type its
parameter has in the request's tool schema (``null``, then ``integer``, ``number``, ``boolean``,
``object``, ``array``, ``string``: the first that reads), and kept as text for a parameter the
schema does not type. A call the answer ends inside keeps its closed parameters.
"""

from __future__ import annotations

import math
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

BLOCK, FUNCTION, FUNCTION_END = "<tool_call>", "<function=", "</function>"
_PARAMETER = re.compile(
    r"<\s*parameter\s*=\s*([^<>]*)>(.*?)(?:<\s*/\s*parameter\s*>|(?=<\s*parameter\s*=))", re.DOTALL
)  # a key holds no "<": tried from each of many unclosed "<parameter=", [^>]* would scan on
# to the answer's end each time (quadratic, on every streamed step)
_ALIASES = {"int": "integer", "float": "number", "double": "number", "bool": "boolean"}
_ALIASES |= {"str": "string", "dict": "object", "list": "array"}
_PRIORITY = ("null", "integer", "number", "boolean", "object", "array", "string")


def _types(schema: Any) -> set[str]:
    """The JSON types a parameter schema allows (its ``type``, its ``enum``'s values, its
    ``anyOf``/``oneOf``/``allOf``); ``string`` when it names none."""
    if not isinstance(schema, dict):
        return {"string"}
    named = schema.get("type")
    types = {named} if isinstance(named, str) else set()
    types |= {t for t in named if isinstance(t, str)} if isinstance(named, list) else set()
    for value in schema.get("enum") or []:
        types.add(_json_type(value))
    for key in ("anyOf", "oneOf", "allOf"):
        for choice in schema.get(key) or []:
            types |= _types(choice)
    return {_ALIASES.get(t.strip().lower(), t.strip().lower()) for t in types} or {"string"}


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    for kind, name in ((bool, "boolean"), (int, "integer"), (float, "number"), (str, "string")):
        if isinstance(value, kind):
            return name
    return "array" if isinstance(value, list) else "object"


def _typed(value: str, types: set[str]) -> Any:
    for kind in _PRIORITY:
        if kind not in types:
            continue
        if kind == "string":
            return value
        if kind == "null" and value.lower() == "null":
            return None
        if kind == "integer" and re.fullmatch(r"\s*[-+]?\d+\s*", value):
            try:
                return int(value)
            except ValueError:  # more digits than Python reads (or JSON carries)
                continue
        if kind == "number":
            try:
                number = float(value)
            except ValueError:
                continue
            if math.isfinite(number):
                return int(number) if number == int(number) else number
        if kind == "boolean" and value.strip().lower() in ("true", "1", "false", "0"):
            return value.strip().lower() in ("true", "1")
        if kind in ("object", "array"):
            try:
                return loads(value)
            except NotJson:
                continue
    try:
        return loads(value)
    except NotJson:
        return value


class Qwen3XmlParser(ToolParser):
    def split(self, text: str, final: bool) -> tuple[str, list[Call]]:
        starts = [s for s in (text.find(BLOCK), text.find(FUNCTION)) if s >= 0]
        if not starts:
            if final:
                return text, []
            hold = max(held_back(text, BLOCK), held_back(text, FUNCTION))
            return text[: len(text) - hold], []
        first = min(starts)
        calls = []
        start = text.find(FUNCTION, first)
        while start >= 0:
            name_end = text.find(">", start)
            if name_end < 0:
                break
            end = text.find(FUNCTION_END, name_end)
            if end < 0 and not final:
                break  # read once it is whole
            name = text[start + len(FUNCTION) : name_end].strip()
            body = text[name_end + 1 : end if end >= 0 else len(text)]
            calls.append((name, self._arguments(name, body)))
            if end < 0:
                break
            start = text.find(FUNCTION, end)
        if calls:
            return text[:first], calls
        return (text, []) if final else (text[:first], [])

    def _arguments(self, name: str, body: str) -> str:
        properties = self._properties(name)
        arguments: dict[str, Any] = {}
        for match in _PARAMETER.finditer(body):
            key, value = match[1].strip(), match[2]
            value = value.removeprefix("\n").removesuffix("\n")
            arguments[key] = _typed(value, _types(properties[key])) if key in properties else value
        return dumps(arguments)

    def _properties(self, name: str) -> dict[str, Any]:
        for tool in self.tools:
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and function.get("name") == name:
                parameters = function.get("parameters")
                properties = parameters.get("properties") if isinstance(parameters, dict) else None
                return properties if isinstance(properties, dict) else {}
        return {}
