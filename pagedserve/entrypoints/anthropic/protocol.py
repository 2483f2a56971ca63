"""The request bodies of Anthropic's Messages API: ``POST /v1/messages`` and
``POST /v1/messages/count_tokens`` (the same body without the generation fields).

Content blocks are read loosely here (a ``type`` and the fields any block may carry) and checked
where they become chat messages (``chat_request``), which names the block it cannot honour.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from pagedserve.entrypoints.openai.protocol import StructuredOutputs
from pagedserve.entrypoints.openai.request_body import OpenAIModel, RequestBody


class ContentBlock(OpenAIModel):
    """One block of a message's content (or of a ``tool_result``'s)."""

    type: str
    text: str | None = None  # text
    id: str | None = None  # tool_use
    name: str | None = None  # tool_use
    input: dict[str, Any] | None = None  # tool_use
    tool_use_id: str | None = None  # tool_result
    content: str | list[ContentBlock] | None = None  # tool_result
    is_error: bool | None = None  # tool_result: the call failed

    @model_validator(mode="after")
    def _text_has_text(self) -> ContentBlock:
        if self.type == "text" and self.text is None:
            raise ValueError("a text block needs its text, a string")
        return self


class Message(OpenAIModel):
    # "system" beside Anthropic's two roles, as vLLM accepts it (agents send inline reminders)
    role: Literal["user", "assistant", "system"]
    content: str | list[ContentBlock]


class Tool(OpenAIModel):
    """A client tool; Anthropic's server tools (web search, code execution, ...) carry a
    ``type`` of their own and are refused where they are translated."""

    name: str
    description: str | None = None
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoice(OpenAIModel):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None  # type "tool"
    disable_parallel_tool_use: bool | None = None


class ThinkingConfig(OpenAIModel):
    type: Literal["enabled", "disabled", "adaptive"]
    budget_tokens: int | None = None  # type "enabled": at least 1024, less than max_tokens
    display: Literal["summarized", "omitted"] | None = None  # omitted: empty thinking blocks


class OutputFormat(OpenAIModel):
    type: Literal["json_schema"]
    json_schema: dict[str, Any] = Field(alias="schema")


class OutputConfig(OpenAIModel):
    effort: Literal["low", "medium", "high", "xhigh", "max"] | None = None
    format: OutputFormat | None = None


class Metadata(OpenAIModel):
    user_id: str | None = None


class CountTokensRequest(RequestBody):
    """What a prompt is made of: the body of ``/v1/messages/count_tokens``."""

    model: str
    messages: list[Message]
    system: str | list[ContentBlock] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None
    output_config: OutputConfig | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # vLLM's extra


class MessagesRequest(CountTokensRequest):
    """The body of ``/v1/messages``: a prompt and how to answer it."""

    max_tokens: int = Field(ge=1)
    stop_sequences: list[str] | None = None
    stream: bool | None = False
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = None
    cache_salt: str | None = None  # vLLM's extra
    structured_outputs: StructuredOutputs | None = None  # vLLM's extra, as on chat
