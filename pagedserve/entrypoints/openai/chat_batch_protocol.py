"""The body of ``POST /v1/chat/completions/batch`` (vLLM's): chat's fields, with ``messages`` a
list of conversations, each answered as a chat request of its own with the other fields."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest


class BatchChatCompletionRequest(BaseModel):
    """Chat's fields (validated per conversation, as each one's chat request); as in vLLM, no
    streaming, tool calls (``tools`` only reach the template), beam search or ``n`` over 1."""

    model_config = ConfigDict(extra="allow")

    messages: list[Annotated[list[Any], Field(min_length=1)]] = Field(min_length=1)

    def chat_requests(self) -> list[ChatCompletionRequest]:
        """One chat request per conversation; a 400 for what a batch does not take."""
        shared = dict(self.model_extra or {})
        shared.setdefault("tool_choice", "none")
        refused = {
            "stream": "Batch chat completions do not support streaming.",
            "use_beam_search": "Batch chat completions do not support beam search.",
        }
        for name, message in refused.items():
            if shared.get(name):
                raise bad_request(message, param=name)
        if shared.get("n") not in (None, 1):
            raise bad_request("Batch chat completions do not support `n > 1`.", param="n")
        if shared["tool_choice"] not in (None, "none"):
            raise bad_request(
                'Batch chat completions take only tool_choice "none".', param="tool_choice"
            )
        return [
            _chat_request(shared, conversation, i) for i, conversation in enumerate(self.messages)
        ]


def _chat_request(shared: dict[str, Any], conversation: list[Any], i: int) -> ChatCompletionRequest:
    try:
        return ChatCompletionRequest.model_validate({**shared, "messages": conversation})
    except ValidationError as exc:
        errors = [
            {**e, "loc": ("body", "messages", i, *e["loc"][1:])}
            if e["loc"][:1] == ("messages",)
            else {**e, "loc": ("body", *e["loc"])}
            for e in exc.errors()
        ]
        raise RequestValidationError(errors) from exc
