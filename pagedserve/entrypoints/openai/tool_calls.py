"""Forced tool calls: ``tool_choice`` naming a function, or ``"required"``, with any model.

As vLLM does without a model-specific parser, the engine's structured outputs force the answer
into a JSON shape that is read back as tool calls, so no tool-call format of the model's own is
needed:
- a named function: the answer is its ``arguments`` object, under the function's parameters
  schema; the call goes back with ``finish_reason`` ``stop`` (as OpenAI answers a forced call);
- ``required``: the answer is a non-empty JSON array of ``{"name", "parameters"}`` objects, one
  per call, each under its function's schema (one call at most with ``parallel_tool_calls``
  false); the calls go back with ``finish_reason`` ``tool_calls``.

``auto`` needs a parser that knows when the model chose to call a tool; that is not built yet.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from pagedserve.entrypoints.openai.errors import bad_request

NAMED = "named"
REQUIRED = "required"


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's ``function`` object; a 400 for a tool that is not a function with a name."""
    function = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request("each tool must be {type: function, function: {name, ...}}", "tools")
    return function


def forced_mode(tools: list[dict[str, Any]] | None, tool_choice: Any) -> tuple[str, str] | None:
    """``(NAMED, function name)`` or ``(REQUIRED, "")`` when the request forces tool calls, None
    for ``none``; a 400 for what cannot be honoured (``auto``, an unknown function, no tools)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools to choose from", param="tool_choice")
        return None
    names = [function_of(t)["name"] for t in tools]
    if tool_choice == "none":
        return None
    if tool_choice is None or tool_choice == "auto":
        raise bad_request(
            "tool_choice 'auto' needs a parser for the model's own tool-call format, which this "
            "server does not have yet; send 'required', a named function, or 'none'",
            param="tool_choice" if tool_choice is not None else "tools",
        )
    if tool_choice == REQUIRED:
        return REQUIRED, ""
    name = tool_choice.get("function", {}).get("name") if isinstance(tool_choice, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            "tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}",
            param="tool_choice",
        )
    if name not in names:
        raise bad_request(f"tool_choice names {name!r}, which is not among tools", "tool_choice")
    return NAMED, name


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    return function.get("parameters") or {"type": "object", "properties": {}}


def forced_schema(
    tools: list[dict[str, Any]], mode: tuple[str, str], parallel: bool
) -> dict[str, Any]:
    """The JSON schema the answer is held to."""
    kind, name = mode
    functions = [function_of(t) for t in tools]
    if kind == NAMED:
        return _parameters(next(f for f in functions if f["name"] == name))
    call = {
        "anyOf": [
            {
                "type": "object",
                "properties": {"name": {"const": f["name"]}, "parameters": _parameters(f)},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
            for f in functions
        ]
    }
    return {"type": "array", "items": call, "minItems": 1, **({} if parallel else {"maxItems": 1})}


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def read_calls(
    text: str, mode: tuple[str, str], new_id: Callable[[], str]
) -> list[dict[str, Any]] | None:
    """The tool calls of a finished answer; None when it is not whole (cut by ``max_tokens``),
    in which case a ``required`` answer stays plain text. A named call keeps its arguments text
    as it is, whole or not, as vLLM does."""
    kind, name = mode
    if kind == NAMED:
        return [tool_call(new_id(), name, text)]
    try:
        calls = json.loads(text)
    except json.JSONDecodeError:
        return None
    return [
        tool_call(new_id(), c["name"], json.dumps(c["parameters"], ensure_ascii=False))
        for c in calls
    ]


def calls_finish_reason(mode: tuple[str, str], finish_reason: str | None) -> str | None:
    """``tool_calls`` for the calls of a whole ``required`` answer; a forced named call keeps
    ``stop``, as OpenAI answers one."""
    return "tool_calls" if mode[0] == REQUIRED and finish_reason == "stop" else finish_reason


class ToolCallDeltas:
    """The stream of one choice's forced tool calls: a named call's arguments as they come,
    under one call whose id and name go in its first delta; the calls of a ``required`` answer
    once it is whole, in its last chunk (or its text, if it was cut short)."""

    def __init__(self, mode: tuple[str, str], new_id: Callable[[], str]) -> None:
        self.mode = mode
        self.new_id = new_id
        self.call_id: str | None = None

    def next(
        self, new_text: str, text: str, finish_reason: str | None
    ) -> tuple[dict[str, Any], str | None]:
        """``(delta, finish_reason)`` of the chunk for ``new_text`` (``text``: all so far)."""
        kind, name = self.mode
        if kind == NAMED:
            function: dict[str, Any] = {"arguments": new_text}
            call: dict[str, Any] = {"index": 0, "function": function}
            if self.call_id is None:
                self.call_id = self.new_id()
                call.update(id=self.call_id, type="function")
                function["name"] = name
            elif not new_text:
                return {}, finish_reason
            return {"tool_calls": [call]}, finish_reason
        if finish_reason is None:
            return {}, None
        calls = read_calls(text, self.mode, self.new_id)
        if calls is None:
            return {"content": text}, finish_reason
        deltas = [{"index": k, **c} for k, c in enumerate(calls)]
        return {"tool_calls": deltas}, calls_finish_reason(self.mode, finish_reason)
