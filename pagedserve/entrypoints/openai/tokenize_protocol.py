"""The bodies of vLLM's /tokenize and /detokenize."""

from __future__ import annotations

from typing import Any

from pydantic import Field

from pagedserve.entrypoints.openai.protocol import ChatMessage
from pagedserve.entrypoints.openai.request_body import RequestBody


class TokenizeRequest(RequestBody):
    """vLLM's /tokenize: either ``prompt`` or chat ``messages``."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None  # with messages: what the chat template lists
    return_token_strs: bool = False


class DetokenizeRequest(RequestBody):
    model: str | None = None
    tokens: list[int] = Field(default_factory=list)
