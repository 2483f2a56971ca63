"""Tool calls in chat answers: what ``tool_choice`` asks for, and the calls read back.

Forced calls work with any model. As vLLM does, the engine's structured outputs hold the answer
to a JSON shape that is read back as tool calls, so no tool-call format of the model's own is
needed:
- a named function: the answer is its ``arguments`` object, under the function's parameters
  schema; the call goes back with ``finish_reason`` ``stop`` (as OpenAI answers a forced call);
- ``required``: the answer is a non-empty JSON array of ``{"name", "parameters"}`` objects, one
  per call, each under its function's schema (one call at most with ``parallel_tool_calls``
  false); the calls go back with ``finish_reason`` ``tool_calls``, each call's arguments the
  text of its ``parameters`` as written (streamed, each call goes out once its name is whole and
  its arguments follow as they come; see :mod:`.required_calls`).

``auto`` (the default when tools are given) lets the model answer freely; a parser of its own
tool-call format (:mod:`.tool_parsers`, chosen with ``--tool-call-parser``) reads the calls it
chose to make, which go back with ``finish_reason`` ``tool_calls``; with ``parallel_tool_calls``
false only the first of them, as vLLM answers (nothing holds the model to one call there).
Content that is only whitespace beside the calls is null whole and never streamed (the stream
holds back blank content until it knows), so the streamed content joined is the whole answer's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.required_calls import RequiredCallsReader
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS

NAMED = "named"
REQUIRED = "required"
AUTO = "auto"


def function_of(tool: dict[str, Any]) -> dict[str, Any]:
    """A tool's ``function`` object; a 400 for a tool that is not a function with a name."""
    function = tool.get("function") if tool.get("type", "function") == "function" else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request("each tool must be {type: function, function: {name, ...}}", "tools")
    return function


def refuse_empty_tools(body: Any) -> Any:
    """A chat body as it came, after a 400 for ``tools: []``, whatever its ``tool_choice`` (as
    vLLM and OpenAI answer it): a client sends tools, or leaves the field out."""
    if isinstance(body, dict) and body.get("tools") == []:
        raise bad_request(
            "tools must not be an empty list: give at least one tool, or leave tools out",
            param="tools",
        )
    return body


def tool_mode(
    tools: list[dict[str, Any]] | None, tool_choice: Any, auto_parser: str | None
) -> tuple[str, str] | None:
    """``(NAMED, function name)`` or ``(REQUIRED, "")`` when the request forces tool calls,
    ``(AUTO, parser name)`` when the model may choose, None for ``none`` or no tools; a 400 for
    what cannot be honoured (``auto`` on a server without ``auto_parser``, an unknown function,
    a tool choice without tools)."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise bad_request("tool_choice needs tools to choose from", param="tool_choice")
        return None
    names = [function_of(t)["name"] for t in tools]
    if tool_choice == "none":
        return None
    if tool_choice is None or tool_choice == AUTO:
        if auto_parser is None:
            raise bad_request(
                "tool_choice 'auto' (the default with tools) needs the server started with "
                "--enable-auto-tool-choice and a --tool-call-parser for the model's tool-call "
                "format; or send 'required', a named function, or 'none'",
                param="tool_choice" if tool_choice is not None else "tools",
            )
        return AUTO, auto_parser
    if tool_choice == REQUIRED:
        return REQUIRED, ""
    named = isinstance(tool_choice, dict) and tool_choice.get("type", "function") == "function"
    function = tool_choice.get("function") if named else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise bad_request(
            "tool_choice must be 'none', 'auto', 'required' or {type: function, function: {name}}",
            param="tool_choice",
        )
    if name not in names:
        raise bad_request(f"tool_choice names {name!r}, which is not among tools", "tool_choice")
    return NAMED, name


def refuse_beside_forced_calls(constrained: bool, beam_search: bool) -> None:
    """A 400 for forced tool calls beside another output constraint, or beside beam search
    (which ranks the model's raw logprobs: the calls' schema would not hold its answer)."""
    if constrained:
        raise bad_request(
            "a forced tool call already fixes the output; leave out response_format and "
            "structured_outputs",
            param="tool_choice",
        )
    if beam_search:
        raise bad_request(
            "a forced tool call (tool_choice 'required' or a named function) is not supported "
            "with use_beam_search",
            param="tool_choice",
        )


def _parameters(function: dict[str, Any]) -> dict[str, Any]:
    """A function's parameters schema (none: no parameters); a 400 for one that is no object."""
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise bad_request("a tool's parameters must be a JSON schema object", param="tools")
    return parameters or {"type": "object", "properties": {}}


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
    limit = {} if parallel else {"maxItems": 1}
    return {"type": "array", "items": call, "minItems": 1, **limit, **_shared_defs(functions)}


def _shared_defs(functions: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The tools' ``$defs`` (and ``definitions``), for the top of the schema that nests their
    parameters: a ``"$ref": "#/$defs/X"`` points from the root of the whole schema."""
    shared: dict[str, dict[str, Any]] = {}
    for function in functions:
        parameters = _parameters(function)
        for key in ("$defs", "definitions"):
            for name, schema in (parameters.get(key) or {}).items():
                if shared.setdefault(key, {}).setdefault(name, schema) != schema:
                    raise bad_request(
                        f"two tools define {key}/{name} differently; tool_choice 'required' "
                        "needs one meaning for it",
                        param="tools",
                    )
    return shared


def tool_call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def final_answer(
    text: str,
    mode: tuple[str, str],
    finish_reason: str | None,
    new_id: Callable[[], str],
    tools: list[dict[str, Any]] | None = None,
    parallel: bool = True,
) -> tuple[dict[str, Any], str | None]:
    """The message fields (``content``, ``tool_calls``) and finish reason of a finished answer
    (``tools``: the request's, which some ``auto`` parsers read argument types from;
    ``parallel``: false keeps an ``auto`` answer's first call only).

    A named call keeps its arguments text as it is, whole or not, as vLLM does, and so does a
    ``required`` answer cut short by ``max_tokens`` (its last call's arguments unfinished); one
    cut before any call's name, and an ``auto`` answer with no call in it, stay plain text."""
    kind, name = mode
    if kind == NAMED:
        return {"content": None, "tool_calls": [tool_call(new_id(), name, text)]}, finish_reason
    if kind == AUTO:
        content, calls = TOOL_PARSERS[name](tools).split(text, final=True)
        calls = calls if parallel else calls[:1]
        if not calls:
            return {"content": text}, finish_reason
        message = {
            "content": content if content.strip() else None,
            "tool_calls": [tool_call(new_id(), *call) for call in calls],
        }
        return message, "tool_calls"
    calls = [c for c in RequiredCallsReader().read(text) if c.name is not None]
    if not calls:
        return {"content": text}, finish_reason
    message = {
        "content": None,
        "tool_calls": [tool_call(new_id(), c.name, c.arguments(text)) for c in calls],
    }
    return message, _required_finish(finish_reason)


def _required_finish(finish_reason: str | None) -> str | None:
    return "tool_calls" if finish_reason == "stop" else finish_reason


class ToolCallDeltas:
    """The stream of one choice's tool calls.

    A named call streams its arguments as they come, under one call whose id and name go in its
    first delta; so does each call of a ``required`` answer, once its name is whole (an answer
    cut before any name comes as text in its last chunk). With ``auto`` the model's content
    streams as it comes (what is only whitespace waits for a character that is not, or for the
    end of an answer without calls), and each call goes out whole as soon as the parser sees it
    complete.
    """

    def __init__(
        self,
        mode: tuple[str, str],
        new_id: Callable[[], str],
        tools: list[dict[str, Any]] | None = None,
        parallel: bool = True,
    ) -> None:
        self.mode = mode
        self.parallel = parallel  # false: an auto answer's first call only
        self.new_id = new_id
        self.call_id: str | None = None
        self.parser = TOOL_PARSERS[mode[1]](tools) if mode[0] == AUTO else None
        self.content_sent = 0
        self.calls_sent = 0
        self.required = RequiredCallsReader() if mode[0] == REQUIRED else None
        self.arguments_sent: list[int] = []  # per required call, its arguments' length sent

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
        if kind == AUTO:
            return self._auto(text, finish_reason)
        return self._required(text, finish_reason)

    def _required(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        assert self.required is not None
        deltas = []
        for k, call in enumerate(self.required.read(text)):
            if call.name is None:
                break
            arguments = call.arguments(text)
            if k == len(self.arguments_sent):
                deltas.append({"index": k, **tool_call(self.new_id(), call.name, arguments)})
                self.arguments_sent.append(len(arguments))
            elif len(arguments) > self.arguments_sent[k]:
                new = arguments[self.arguments_sent[k] :]
                deltas.append({"index": k, "function": {"arguments": new}})
                self.arguments_sent[k] = len(arguments)
        if finish_reason is not None and not self.arguments_sent:
            return {"content": text}, finish_reason
        if finish_reason is not None:
            finish_reason = _required_finish(finish_reason)
        return ({"tool_calls": deltas} if deltas else {}), finish_reason

    def _auto(self, text: str, finish_reason: str | None) -> tuple[dict[str, Any], str | None]:
        assert self.parser is not None
        final = finish_reason is not None
        content, calls = self.parser.split(text, final)
        calls = calls if self.parallel else calls[:1]
        if final and not calls:  # as final_answer gives it: all text, blank or not
            content = text
        elif not content.strip():  # blank beside calls (or not yet known): held back
            content = ""
        delta: dict[str, Any] = {}
        if len(content) > self.content_sent:
            delta["content"] = content[self.content_sent :]
            self.content_sent = len(content)
        if len(calls) > self.calls_sent:
            delta["tool_calls"] = [
                {"index": k, **tool_call(self.new_id(), *calls[k])}
                for k in range(self.calls_sent, len(calls))
            ]
            self.calls_sent = len(calls)
        if finish_reason is not None and self.calls_sent:
            finish_reason = "tool_calls"
        return delta, finish_reason
