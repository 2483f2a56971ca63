"""The body of OpenAI's Responses API (``POST /v1/responses``) and its translation into the chat
request that the chat path serves.

``instructions`` becomes a system message ahead of the ``input`` messages, ``max_output_tokens``
the chat's ``max_tokens`` and ``text.format`` its ``response_format``. Function tools become chat
tools (``{type, name, parameters}`` nested as ``{type, function: {...}}``), earlier
``function_call`` items an assistant message's ``tool_calls`` and ``function_call_output`` items
tool messages. What the translation cannot honour (other tools, images and files, a stored
conversation to continue, automatic truncation) is a 400 naming the field, never ignored.
``background`` runs are served by ``background_responses``; they need ``store``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ValidationError

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.priority import Priority
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest, StructuredOutputs
from pagedserve.entrypoints.openai.request_body import RequestBody

_TEXT_PARTS = ("input_text", "output_text", "text")


# What OpenAI's include may name (a misspelt one is a 400, as in vLLM, not silently nothing);
# only the output text's logprobs are written here, the others name what this server has not.
Includable = Literal[
    "code_interpreter_call.outputs",
    "computer_call_output.output.image_url",
    "file_search_call.results",
    "message.input_image.image_url",
    "message.output_text.logprobs",
    "reasoning.encrypted_content",
    "web_search_call.action.sources",
    "web_search_call.results",
]


class ResponsesRequest(RequestBody):
    model: str | None = None
    input: str | list[dict[str, Any]]
    instructions: str | None = None
    max_output_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stream: bool | None = False
    text: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    previous_response_id: str | None = None
    store: bool | None = None
    background: bool | None = None
    truncation: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    include: list[Includable] | None = None
    top_logprobs: int | None = None
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra, as on chat
    ignore_eos: bool = False  # vLLM's extra, as on chat
    cache_salt: str | None = None  # vLLM's extra, as on chat
    priority: Priority = 0  # vLLM's extra, as on chat; the X-Vllm-Priority header stands over it

    @property
    def wants_logprobs(self) -> bool:
        """Whether the text parts carry their tokens' logprobs (OpenAI: asked for in
        ``include``, with ``top_logprobs`` alternatives each)."""
        return "message.output_text.logprobs" in (self.include or [])

    def chat_request(self, history: list[dict[str, Any]]) -> ChatCompletionRequest:
        """The chat request that answers this one after the conversation ``history`` (the
        stored turns ``previous_response_id`` continues); a 400 for what it cannot carry."""
        if self.background and self.store is False:
            raise bad_request("background can only be used when store is true", param="background")
        if self.truncation not in (None, "disabled"):
            raise bad_request("only truncation 'disabled' is supported", param="truncation")
        messages = [{"role": "system", "content": self.instructions}] if self.instructions else []
        messages.extend(history)
        messages.extend(self.input_messages())
        try:
            return self._chat_request(messages)
        except ValidationError as exc:
            error = exc.errors()[0]
            field = str(error["loc"][0]) if error["loc"] else "input"
            field = {"messages": "input", "response_format": "text"}.get(field, field)
            raise bad_request(f"{field}: {error['msg']}", param=field) from exc

    def _chat_request(self, messages: list[dict[str, Any]]) -> ChatCompletionRequest:
        return ChatCompletionRequest(
            model=self.model,
            messages=messages,
            max_tokens=self.max_output_tokens,
            temperature=self.temperature,
            top_p=self.top_p,
            stream=self.stream,
            response_format=self._response_format(),
            structured_outputs=self.structured_outputs,
            tools=[_chat_tool(t) for t in self.tools] if self.tools else None,
            tool_choice=_chat_tool_choice(self.tool_choice),
            parallel_tool_calls=self.parallel_tool_calls,
            logprobs=self.wants_logprobs,
            top_logprobs=self.top_logprobs if self.wants_logprobs else None,
            user=self.user,
            ignore_eos=self.ignore_eos,
            cache_salt=self.cache_salt,
            priority=self.priority,
        )

    def input_messages(self) -> list[dict[str, Any]]:
        """``input`` as chat messages."""
        if isinstance(self.input, str):
            return [{"role": "user", "content": self.input}]
        if not self.input:
            raise bad_request("input must not be empty", param="input")
        messages: list[dict[str, Any]] = []
        for item in self.input:
            kind = item.get("type", "message")
            if kind == "function_call":
                call = {
                    "id": item.get("call_id"),
                    "type": "function",
                    "function": {"name": item.get("name"), "arguments": item.get("arguments")},
                }
                last = messages[-1] if messages else None
                if last is not None and last["role"] == "assistant" and last.get("tool_calls"):
                    last["tool_calls"].append(call)  # parallel calls share one message
                else:
                    messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
            elif kind == "function_call_output":
                if "output" not in item:
                    raise bad_request("a function_call_output needs its output", param="input")
                output = _text(item["output"])
                messages.append(
                    {"role": "tool", "tool_call_id": item.get("call_id"), "content": output}
                )
            elif kind == "reasoning":
                continue  # earlier turns' reasoning is left out, as chat templates drop it
            else:
                messages.append(_message(item))
        return messages

    def _response_format(self) -> dict[str, Any] | None:
        fmt = (self.text or {}).get("format")
        if fmt is None:
            return None
        if not isinstance(fmt, dict) or fmt.get("type") not in (
            "text",
            "json_object",
            "json_schema",
        ):
            raise bad_request(
                "text.format type must be 'text', 'json_object' or 'json_schema'", param="text"
            )
        if fmt["type"] != "json_schema":
            return {"type": fmt["type"]}
        if not isinstance(fmt.get("schema"), dict):
            raise bad_request("text.format of type json_schema needs a schema", param="text")
        # The Responses API puts the schema's name and body beside its type; chat nests them.
        schema = {k: fmt[k] for k in ("name", "description", "schema", "strict") if k in fmt}
        return {"type": "json_schema", "json_schema": schema}


def _chat_tool(tool: dict[str, Any]) -> dict[str, Any]:
    """A Responses function tool (``{type, name, description, parameters}``) as a chat tool."""
    if tool.get("type") != "function":
        raise bad_request(
            f"only function tools are supported, got {tool.get('type')!r}", param="tools"
        )
    if not isinstance(tool.get("name"), str):
        raise bad_request("a function tool needs a name (a string)", param="tools")
    fields = ("name", "description", "parameters", "strict")
    return {"type": "function", "function": {k: tool[k] for k in fields if k in tool}}


def _chat_tool_choice(choice: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
    """``{type: function, name}`` as chat's ``{type: function, function: {name}}``."""
    if isinstance(choice, dict) and choice.get("type") == "function" and "name" in choice:
        return {"type": "function", "function": {"name": choice["name"]}}
    return choice


def _message(item: dict[str, Any]) -> dict[str, str]:
    """One input item as a chat message: a message whose content is text."""
    kind = item.get("type", "message")
    if kind != "message" or "role" not in item:
        raise bad_request(
            f"input items of type {kind!r} are not supported; send messages with a role",
            param="input",
        )
    if not isinstance(item["role"], str):
        raise bad_request("a message's role must be a string", param="input")
    return {"role": item["role"], "content": _text(item.get("content"))}


def _text(content: Any) -> str:
    """A message's content or a function call's output, a string or a list of text parts, as
    one string."""
    if isinstance(content, list):
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") not in _TEXT_PARTS:
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise bad_request(f"only text content is supported, got {kind!r}", param="input")
            if not isinstance(part.get("text"), str):
                raise bad_request("a text content part needs its text (a string)", param="input")
            parts.append(part["text"])
        content = "".join(parts)
    if not isinstance(content, str):
        raise bad_request("a message's content must be text", param="input")
    return content
