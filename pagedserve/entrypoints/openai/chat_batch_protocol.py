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
        """One chat request per conversation; a 400 for what a batch does not take, judged on
        the fields as chat reads them (``"stream": "false"`` is no stream)."""
        shared = dict(self.model_extra or {})
        shared.setdefault("tool_choice", "none")
        requests = [
            _chat_request(shared, conversation, i) for i, conversation in enumerate(self.messages)
        ]
        first = requests[0]
        if first.stream:
            raise bad_request("Batch chat completions do not support streaming.", param="stream")
        if first.use_beam_search:
            raise bad_request(
                "Batch chat completions do not support beam search.", param="use_beam_search"
            )
        if first.n > 1:
            raise bad_request("Batch chat completions do not support `n > 1`.", param="n")
        if first.tool_choice not in (None, "none"):
            raise bad_request(
                'Batch chat completions take only tool_choice "none".', param="tool_choice"
            )
        return requests


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
