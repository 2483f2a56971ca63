"""A Messages API request as the chat request that serves it.

``system`` becomes a leading system message, less Claude Code's ``x-anthropic-billing-header``
block (its per-request hash would defeat the prefix cache; vLLM drops it too). A system turn
inside ``messages`` (agents' reminders) stays where it is, or, where the chat template allows a
system message only first, joins the leading one, as vLLM does. Each message's blocks become chat messages: text
blocks the message's text parts, an assistant's ``tool_use`` blocks its ``tool_calls`` (the
input as JSON arguments), a user's ``tool_result`` blocks ``tool`` messages ahead of its text
(the text of a result with ``is_error`` begins ``Error:``, so that the model reads that its call
failed; vLLM drops the flag).
Earlier ``thinking`` blocks are left out of the prompt (chat templates drop past reasoning too).
A conversation that ends with an assistant's text is a prefill: the answer continues it, as
Anthropic's API does. Tools become chat function tools and ``tool_choice`` chat's (``any`` is
``required``). ``thinking`` ``enabled`` sets the ``thinking_token_budget``, ``disabled`` turns
the template's thinking off (``reasoning_effort`` ``"none"``), and ``output_config.effort`` is
the ``reasoning_effort``. What cannot be honoured (images and documents, server tools, thinking
on a server without a reasoning parser) is a 400 naming it.
"""

from __future__ import annotations

import json
from typing import Any

from pydantic import ValidationError

from pagedserve.entrypoints.anthropic.protocol import (
    ContentBlock,
    CountTokensRequest,
    Message,
    MessagesRequest,
    Tool,
    ToolChoice,
)
from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest

MIN_THINKING_BUDGET = 1024  # Anthropic's least budget_tokens
TOOL_ERROR = "Error:"  # begins the text of a tool_result with is_error
BILLING_HEADER = "x-anthropic-billing-header"


def chat_request(
    req: CountTokensRequest,
    reasoning_parser: bool,
    max_model_len: int,
    merge_inline_system: bool = False,
) -> ChatCompletionRequest:
    """The chat request answering ``req`` on a server with (or without) a reasoning parser and
    a context of ``max_model_len`` tokens, with the system turns of ``messages`` merged into
    the leading system message or not; a 400 for what it cannot carry."""
    parts = [_system_text(req.system, "system")]
    if merge_inline_system:
        inline = [(i, m) for i, m in enumerate(req.messages) if m.role == "system"]
        parts += [_system_text(m.content, f"messages[{i}]") for i, m in inline]
    text = "\n".join(part for part in parts if part)
    messages = [{"role": "system", "content": text}] if text else []
    for i, message in enumerate(req.messages):
        if message.role == "system" and merge_inline_system:
            continue
        messages.extend(_chat_messages(message, i))
    prefill = bool(messages) and messages[-1]["role"] == "assistant"
    prefill = prefill and not messages[-1].get("tool_calls")
    fields: dict[str, Any] = {
        "model": req.model,
        "messages": messages,
        "add_generation_prompt": not prefill,
        "continue_final_message": prefill,
        "chat_template_kwargs": req.chat_template_kwargs,
        "reasoning_effort": _reasoning_effort(req),
        "thinking_token_budget": _thinking_budget(req, reasoning_parser),
        "response_format": _response_format(req),
    }
    if req.tool_choice is not None:
        fields.update(_chat_tool_choice(req.tool_choice))
    if isinstance(req, MessagesRequest):
        fields.update(_generation_fields(req, max_model_len))
    try:
        chat = ChatCompletionRequest(**fields)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"]) or "body"
        raise bad_request(f"{where}: {error['msg']}") from exc
    # Set after the chat body's checks: an empty list of tools is no tools here, as in vLLM's
    # Messages API, where chat's body refuses it.
    if req.tools is not None:
        chat.tools = [_chat_tool(tool) for tool in req.tools]
    return chat


def _generation_fields(req: MessagesRequest, max_model_len: int) -> dict[str, Any]:
    """The sampling fields. Anthropic's clients send the ``max_tokens`` of Anthropic's models
    (coding agents 32000 and more), so a ``max_tokens`` over this model's context is cut to it
    rather than refused, and to what the prompt leaves of it (as vLLM does)."""
    metadata = req.metadata
    return {
        "max_tokens": min(req.max_tokens, max_model_len),
        "stop": req.stop_sequences,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "top_k": req.top_k,
        "stream": req.stream,
        "user": metadata.user_id if metadata is not None else None,
        "cache_salt": req.cache_salt,
        "structured_outputs": req.structured_outputs,
    }


def _system_text(system: str | list[ContentBlock] | None, where: str) -> str:
    """The text of a system prompt or turn, less a billing-header block."""
    if system is None or isinstance(system, str):
        return "" if system is None or system.startswith(BILLING_HEADER) else system
    return _texts([b for b in system if not (b.text or "").startswith(BILLING_HEADER)], where)


def _texts(blocks: list[ContentBlock], where: str) -> str:
    """The text of blocks that may only be text, joined by newlines."""
    for block in blocks:
        if block.type != "text" or block.text is None:
            raise bad_request(f"{where}: only text blocks are supported here, got {block.type!r}")
    return "\n".join(block.text or "" for block in blocks)


def _chat_messages(message: Message, index: int) -> list[dict[str, Any]]:
    """One message as chat messages: a user's tool results come first, as ``tool`` messages."""
    role, where = message.role, f"messages[{index}]"
    if role == "system":
        text = _system_text(message.content, where)
        return [{"role": role, "content": text}] if text else []
    if isinstance(message.content, str):
        return [{"role": role, "content": message.content}]
    parts: list[dict[str, str]] = []
    calls: list[dict[str, Any]] = []
    results: list[dict[str, Any]] = []
    for block in message.content:
        kind = block.type
        if kind == "text":
            parts.append({"type": "text", "text": block.text or ""})
        elif kind in ("thinking", "redacted_thinking") and role == "assistant":
            continue
        elif kind == "tool_use" and role == "assistant":
            calls.append(_chat_call(block, where))
        elif kind == "tool_result" and role == "user":
            results.append(_tool_message(block, where))
        elif kind in ("image", "document"):
            raise bad_request(f"{where}: {kind} blocks are not supported: this model reads text")
        else:
            raise bad_request(f"{where}: a {role} message can not hold a {kind!r} block")
    if not parts and not calls:
        return results
    chat: dict[str, Any] = {"role": role, "content": parts or None}
    if calls:
        chat["tool_calls"] = calls
    return [*results, chat]


def _chat_call(block: ContentBlock, where: str) -> dict[str, Any]:
    if not block.id or not block.name:
        raise bad_request(f"{where}: a tool_use block needs an id and a name")
    arguments = json.dumps(block.input or {}, ensure_ascii=False)
    return {
        "id": block.id,
        "type": "function",
        "function": {"name": block.name, "arguments": arguments},
    }


def _tool_message(block: ContentBlock, where: str) -> dict[str, Any]:
    """A ``tool_result`` as the ``tool`` message answering its call."""
    if not block.tool_use_id:
        raise bad_request(f"{where}: a tool_result block needs a tool_use_id")
    content = block.content
    text = _texts(content, f"{where}: tool_result") if isinstance(content, list) else content
    if block.is_error:
        text = f"{TOOL_ERROR} {text}" if text else TOOL_ERROR
    return {"role": "tool", "tool_call_id": block.tool_use_id, "content": text or ""}


def _chat_tool(tool: Tool) -> dict[str, Any]:
    if tool.type not in (None, "custom"):
        raise bad_request(
            f"tools: {tool.name!r} is one of Anthropic's server tools ({tool.type}); only client "
            "tools (name, description, input_schema) are supported"
        )
    if tool.input_schema is None:
        raise bad_request(f"tools: {tool.name!r} needs an input_schema")
    function = {"name": tool.name, "parameters": tool.input_schema}
    if tool.description is not None:
        function["description"] = tool.description
    return {"type": "function", "function": function}


def _chat_tool_choice(choice: ToolChoice) -> dict[str, Any]:
    """``tool_choice`` and ``parallel_tool_calls`` of the chat request."""
    if choice.type == "tool":
        if not choice.name:
            raise bad_request("tool_choice: type 'tool' needs the tool's name")
        chat_choice: str | dict[str, Any] = {"type": "function", "function": {"name": choice.name}}
    else:
        chat_choice = {"auto": "auto", "any": "required", "none": "none"}[choice.type]
    return {
        "tool_choice": chat_choice,
        "parallel_tool_calls": not choice.disable_parallel_tool_use,
    }


def _reasoning_effort(req: CountTokensRequest) -> str | None:
    """What the chat template is told of thinking: ``output_config.effort``, or ``"none"``
    (``enable_thinking`` off) for ``thinking`` ``disabled``."""
    if req.thinking is not None and req.thinking.type == "disabled":
        return "none"
    return req.output_config.effort if req.output_config is not None else None


def _thinking_budget(req: CountTokensRequest, reasoning_parser: bool) -> int | None:
    """``thinking.budget_tokens`` (of type ``enabled``) as chat's ``thinking_token_budget``,
    checked as Anthropic's API checks it; the server needs a reasoning parser to follow it."""
    thinking = req.thinking
    if thinking is None or thinking.type != "enabled":
        return None
    if not reasoning_parser:
        raise bad_request(
            "thinking: this server returns no thinking blocks; start it with --reasoning-parser "
            "for a reasoning model"
        )
    budget = thinking.budget_tokens
    if budget is None or budget < MIN_THINKING_BUDGET:
        raise bad_request(f"thinking.budget_tokens: must be at least {MIN_THINKING_BUDGET}")
    if isinstance(req, MessagesRequest) and budget >= req.max_tokens:
        raise bad_request("thinking.budget_tokens: must be less than max_tokens")
    return budget


def _response_format(req: CountTokensRequest) -> dict[str, Any] | None:
    """``output_config.format`` as chat's ``response_format``: the answer held to a schema."""
    fmt = req.output_config.format if req.output_config is not None else None
    if fmt is None:
        return None
    return {"type": "json_schema", "json_schema": {"name": "output", "schema": fmt.json_schema}}
