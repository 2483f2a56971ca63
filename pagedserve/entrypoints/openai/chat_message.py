"""A chat message: as the API takes it (OpenAI's fields, vLLM's ``reasoning``) and as chat
templates read it."""

from __future__ import annotations

import json
from typing import Any

from pydantic import BaseModel, ConfigDict

from pagedserve.entrypoints.openai.errors import bad_request


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ContentPart(_Model):
    type: str
    text: str | None = None


class ChatMessage(_Model):
    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None  # an assistant's earlier calls
    tool_call_id: str | None = None  # a tool message: the call it answers
    reasoning: str | None = None  # an assistant's earlier thinking, which templates may show
    reasoning_content: str | None = None  # the same under its older name


def message_text(message: ChatMessage, index: int) -> str | None:
    """A message's content as text: its text parts joined by newlines; a 400 for another part."""
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if part.type != "text" or part.text is None:
                raise bad_request(
                    f"messages[{index}]: content part type {part.type!r} is not supported "
                    "(only 'text')",
                    param="messages",
                )
            texts.append(part.text)
        content = "\n".join(texts)
    return content


def template_message(message: ChatMessage, index: int) -> dict[str, Any]:
    """A message as chat templates read it (``index``: its place, for errors)."""
    out: dict[str, Any] = {"role": message.role, "content": message_text(message, index) or ""}
    if message.name is not None:
        out["name"] = message.name
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    if message.tool_calls:
        out["tool_calls"] = [_template_call(call, index) for call in message.tool_calls]
    reasoning = message.reasoning if message.reasoning is not None else message.reasoning_content
    if message.role == "assistant" and reasoning is not None:  # under both names, as vLLM
        out["reasoning"] = out["reasoning_content"] = reasoning
    return out


def _template_call(call: dict[str, Any], index: int) -> dict[str, Any]:
    """An earlier tool call as chat templates take it: the arguments as an object, not the JSON
    text the API carries (as vLLM hands them over)."""
    function = call.get("function")
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise bad_request(f"messages[{index}]: a tool call needs function.name", "messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass
    return {**call, "function": {**function, "arguments": arguments}}
