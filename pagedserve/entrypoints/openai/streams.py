"""The engine's output streams over HTTP: drained for a whole answer, merged when a request has
several, cancelled with the client, and written as OpenAI's server-sent events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from pagedserve.engine.async_engine import EngineError, RequestStream
from pagedserve.entrypoints.openai.errors import APIError
from pagedserve.outputs import RequestOutput

SSE_DONE = b"data: [DONE]\n\n"


def sse(obj: dict[str, Any]) -> bytes:
    """One server-sent event carrying a JSON object, as the OpenAI API frames it."""
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


# Why an answer finished with reason "error": what a whole answer's 400 and a stream's error say.
CONSTRAINTS_FAILED = (
    "the request's constraints could not be followed to the end: together (allowed_token_ids, "
    "bad_words, min_tokens, the output constraint) they left no token to write, or the output "
    "constraint's grammar hit one of the grammar engine's limits (the server log names it)"
)


async def last_output(stream: RequestStream) -> RequestOutput:
    """Drain a stream and return its final (cumulative) output."""
    final: RequestOutput | None = None
    try:
        async for out in stream:
            final = out
    except EngineError as exc:
        raise APIError(500, str(exc)) from exc
    finally:
        stream.abort()
    if final is None:
        raise APIError(503, "the request was aborted before it produced any output")
    if isinstance(final, RequestOutput) and any(c.finish_reason == "error" for c in final.outputs):
        raise APIError(400, CONSTRAINTS_FAILED)
    return final


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of several streams as they come, tagged with the stream's position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
            queue.put_nowait((i, None))
        except Exception as exc:  # noqa: BLE001 - re-raised by the consumer
            queue.put_nowait((i, exc))

    tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.abort()


async def _wait_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def cancel_on_disconnect(
    request: Request, handler: Callable[[], Awaitable[Response]]
) -> Response:
    """Run a non-streaming handler, cancelling it (and so aborting its requests) if the client
    goes away first."""
    work = asyncio.ensure_future(handler())
    watch = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        work.cancel()
        raise
    finally:
        watch.cancel()
    if work.done():
        return work.result()
    work.cancel()
    try:
        await work
    except asyncio.CancelledError:
        pass
    return Response(status_code=499)


class SSEResponse(StreamingResponse):
    """A server-sent-event stream that runs ``on_close`` however it ends.

    The body generator's own ``finally`` does not run when the client leaves before the first
    chunk (the generator never started), so the abort lives here.
    """

    def __init__(self, content: AsyncIterator[bytes], on_close: Callable[[], None]) -> None:
        super().__init__(
            content,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self._on_close = on_close

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()
