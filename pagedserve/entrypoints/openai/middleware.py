"""The server's ASGI middleware: the API-key and body-size guard, the ``X-Request-Id`` header,
the answer to an unexpected error, and the access log's endpoint filter."""

from __future__ import annotations

import hmac
import logging
import uuid

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagedserve.entrypoints.openai.errors import APIError, internal_error

# Probes and scrapes carry no key.
OPEN_PATHS = frozenset({"/health", "/ready", "/readyz", "/ping", "/metrics"})


class HttpMiddleware:
    """An ASGI middleware that handles HTTP requests (``http``) and passes the rest through."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class GuardMiddleware(HttpMiddleware):
    """API key and request-size checks, before any routing or parsing.

    The key comes as ``Authorization: Bearer <key>`` (OpenAI's clients) or ``x-api-key: <key>``
    (Anthropic's).

    The body is read here, up to the limit, and replayed to the app; a bigger body (by
    Content-Length or as streamed) gets a 413 without being buffered further. Every POST endpoint
    takes JSON, so the body is read as JSON whatever its Content-Type says (``curl -d`` sends
    form-urlencoded).
    """

    def __init__(self, app: ASGIApp, api_keys: list[str], max_body_bytes: int) -> None:
        super().__init__(app)
        self.expected = [f"Bearer {key}".encode() for key in api_keys]
        self.max_body = max_body_bytes

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = dict(scope["headers"])
        if self.expected and scope["path"] not in OPEN_PATHS:
            given = [headers.get(b"authorization", b"")]
            if b"x-api-key" in headers:  # how Anthropic's clients send it
                given.append(b"Bearer " + headers[b"x-api-key"])
            if not any([hmac.compare_digest(g, key) for g in given for key in self.expected]):
                error = APIError(
                    401,
                    "Incorrect or missing API key. Pass it as 'Authorization: Bearer <key>' "
                    "or 'x-api-key: <key>'.",
                    code="invalid_api_key",
                )
                await error.response()(scope, receive, send)
                return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        too_large = APIError(
            413,
            f"The request body is larger than the limit of {self.max_body} bytes.",
            code="request_too_large",
        )
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_body:
            await too_large.response()(scope, receive, send)
            return
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                await too_large.response()(scope, receive, send)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        scope = {**scope, "headers": _as_json(scope["headers"])}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _as_json(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    kept = [(k, v) for k, v in headers if k != b"content-type"]
    return [*kept, (b"content-type", b"application/json")]


class RequestIdMiddleware(HttpMiddleware):
    """Answers every response with an ``X-Request-Id`` header: the request's own, else a new one
    (vLLM's ``--enable-request-id-headers``)."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        request_id = Headers(scope=scope).get("x-request-id") or uuid.uuid4().hex

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append("X-Request-Id", request_id)
            await send(message)

        await self.app(scope, receive, send_with_id)


class InternalErrorMiddleware(HttpMiddleware):
    """Answers an exception that no handler took with a 500 in OpenAI's schema.

    Starlette's own last-resort handler (``exception_handler(Exception)``) answers too, but then
    re-raises for the server's log, and uvicorn drops the connection: a client that keeps it
    alive for its next request (the ``openai`` client does) fails that one as well. An error
    after the response started (a stream) still goes up, the only way to cut the response."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def watch(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception as exc:
            if started:
                raise
            await internal_error(exc)(scope, receive, send)


class AccessLogFilter(logging.Filter):
    """Drops uvicorn's access-log lines of the given paths (vLLM's
    ``--disable-access-log-for-endpoints``, for health checks and metrics scrapes)."""

    def __init__(self, paths: set[str]) -> None:
        super().__init__()
        self.paths = paths

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str):
            return args[2].split("?", 1)[0] not in self.paths
        return True


class LoadMiddleware(HttpMiddleware):
    """Counts the requests in flight on the endpoints that run the model (vLLM's
    ``--enable-server-load-tracking``, read at ``GET /load``), streams until their last chunk."""

    def __init__(self, app: ASGIApp, paths: frozenset[str], counter: list[int]) -> None:
        super().__init__(app)
        self.paths = paths
        self.counter = counter  # one cell, shared with the /load route

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["path"] not in self.paths:
            await self.app(scope, receive, send)
            return
        self.counter[0] += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.counter[0] -= 1
