"""Errors in Anthropic's schema on the Messages API's routes:
``{"type": "error", "error": {"type", "message"}}``, the type named for the HTTP status.

The server's errors are written in OpenAI's schema wherever they arise (the API-key and body-size
guard, request validation, the chat path's checks, the last-resort 500), so this middleware
rewrites the error responses of these routes as they leave, keeping their status; a stream's
own failures are ``error`` events already (``message_stream``).
"""

from __future__ import annotations

import json
from http import HTTPStatus
from typing import Any

from starlette.datastructures import MutableHeaders
from starlette.types import Message, Receive, Scope, Send

from pagedserve.entrypoints.openai.middleware import HttpMiddleware

PATH_PREFIX = "/v1/messages"
RENDER_PATH = "/v1/messages/render"  # vLLM's, not Anthropic's: its errors are in OpenAI's schema

_TYPE_BY_STATUS = {
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
}


def error_type(status: int) -> str:
    """Anthropic's error type for an HTTP status."""
    default = "api_error" if status >= 500 else "invalid_request_error"
    return _TYPE_BY_STATUS.get(status, default)


def anthropic_error(status: int, body: bytes) -> bytes:
    """An error response's body, in OpenAI's schema or any other, in Anthropic's."""
    try:
        parsed: Any = json.loads(body)
    except ValueError:
        parsed = None
    given = parsed.get("error") if isinstance(parsed, dict) else None
    message = given.get("message") if isinstance(given, dict) else None
    if not isinstance(message, str):
        message = body.decode(errors="replace").strip() or _phrase(status)
    error = {"type": error_type(status), "message": message}
    return json.dumps({"type": "error", "error": error}).encode()


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "error"


class AnthropicErrorMiddleware(HttpMiddleware):
    """Rewrites the error responses of the Messages API's routes in Anthropic's schema."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"].removeprefix(scope.get("root_path", ""))
        if not path.startswith(PATH_PREFIX) or path == RENDER_PATH:
            await self.app(scope, receive, send)
            return
        held: Message | None = None  # an error's response start, sent with its new body
        chunks: list[bytes] = []

        async def rewrite(message: Message) -> None:
            nonlocal held
            if message["type"] == "http.response.start" and message["status"] >= 400:
                held = message
                return
            if held is None or message["type"] != "http.response.body":
                await send(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = anthropic_error(held["status"], b"".join(chunks))
            headers = MutableHeaders(raw=list(held.get("headers", [])))
            headers["content-type"] = "application/json"
            headers["content-length"] = str(len(body))
            await send({**held, "headers": headers.raw})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, rewrite)
