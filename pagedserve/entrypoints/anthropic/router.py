"""The Messages API's routes on the server's app, beside the OpenAI ones."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from pagedserve.entrypoints.anthropic.errors import AnthropicErrorMiddleware
from pagedserve.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from pagedserve.entrypoints.anthropic.serving import ServingMessages
from pagedserve.entrypoints.openai.serving_chat import ServingChat


def add_anthropic_routes(app: FastAPI, chat: ServingChat) -> None:
    """``POST /v1/messages`` and ``POST /v1/messages/count_tokens``, served by ``chat``; their
    errors, whatever raises them, in Anthropic's schema (add it after the other middleware, so
    that the API-key and body-size guard's are too)."""
    messages = ServingMessages(chat)

    @app.post("/v1/messages")
    async def create_message(req: MessagesRequest, raw: Request) -> Response:
        return await messages.create(req, raw)

    @app.post("/v1/messages/count_tokens")
    async def count_message_tokens(req: CountTokensRequest) -> dict[str, int]:
        return await messages.count_tokens(req)

    app.add_middleware(AnthropicErrorMiddleware)  # type: ignore[arg-type]
