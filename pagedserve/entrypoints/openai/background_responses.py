"""Background responses (``background: true``): the POST answers at once and the answer is written
by an asyncio task in the server, over the same engine path as a response the client waits for.

The stored response moves from ``queued`` to ``in_progress`` (its first output) to
``completed`` or ``incomplete`` (the whole response, stored as a foreground one is), or
``failed`` (with its ``error``). ``POST /v1/responses/{id}/cancel`` (and ``DELETE``) cancels the
task, which aborts its engine request and so frees its KV blocks; the stored response is then
``cancelled``. A background response created with ``stream`` also keeps its events, which the
POST streams and ``GET /v1/responses/{id}?stream=true&starting_after=N`` streams again from event
``N + 1``; leaving such a stream does not stop the response.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from pagedserve.engine.async_engine import RequestStream
from pagedserve.entrypoints.openai.errors import APIError, bad_request
from pagedserve.entrypoints.openai.response_store import ResponseStore
from pagedserve.entrypoints.openai.streams import last_output
from pagedserve.outputs import RequestOutput

logger = logging.getLogger(__name__)

RUNNING = ("queued", "in_progress")


class BackgroundJob(Protocol):
    """What a background run needs of the response being written (``serving_responses._Job``)."""

    id: str
    keep: Callable[[dict[str, Any]], None]
    error: str | None  # the message of the error event its stream ended with, if any

    def response(
        self,
        out: RequestOutput | None,
        output: list[dict[str, Any]] | None = None,
        pending: str = "in_progress",
    ) -> dict[str, Any]: ...

    def events(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]: ...


class EventLog:
    """The events of a streamed background response, kept for its readers."""

    def __init__(self) -> None:
        self.events: list[bytes] = []
        self.closed = False
        self._changed = asyncio.Event()

    def append(self, event: bytes) -> None:
        self.events.append(event)
        self._changed.set()

    def close(self) -> None:
        self.closed = True
        self._changed.set()

    async def read(self, starting_after: int = -1) -> AsyncIterator[bytes]:
        """The events after sequence number ``starting_after``, then each new one as it comes,
        until the response is over."""
        at = max(starting_after + 1, 0)
        while True:
            while at < len(self.events):
                yield self.events[at]
                at += 1
            if self.closed:
                return
            self._changed.clear()
            await self._changed.wait()


class _Marked:
    """A request's output stream that calls ``on_first`` when its first output comes."""

    def __init__(self, stream: RequestStream, on_first: Callable[[], None]) -> None:
        self.stream = stream
        self._on_first: Callable[[], None] | None = on_first

    def __aiter__(self) -> _Marked:
        return self

    async def __anext__(self) -> RequestOutput:
        out = await self.stream.__anext__()
        if self._on_first is not None:
            self._on_first()
            self._on_first = None
        return out

    def abort(self) -> None:
        self.stream.abort()


class BackgroundResponses:
    """The background responses of one server: their tasks, and the events of streamed ones."""

    def __init__(self, store: ResponseStore) -> None:
        self.store = store
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._logs: OrderedDict[str, EventLog] = OrderedDict()

    def start(
        self,
        job: BackgroundJob,
        conversation: list[dict[str, Any]],
        submit: Callable[[], Awaitable[RequestStream]],
        stream: bool,
    ) -> tuple[dict[str, Any], EventLog | None]:
        """Store ``job``'s response as queued and start writing it (``submit`` hands the engine
        its request); returns the queued response, and with ``stream`` the log of its events."""
        queued = job.response(None, pending="queued")
        self.store.save(queued, conversation)
        keep = job.keep
        job.keep = lambda done: self._keep(keep, done)
        log = EventLog() if stream else None
        if log is not None:
            self._logs[job.id] = log
            while len(self._logs) > self.store.capacity:
                self._logs.popitem(last=False)
        task = asyncio.create_task(self._run(job, submit, log), name=f"background {job.id}")
        self._tasks[job.id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job.id, None))
        return queued, log

    def _keep(self, keep: Callable[[dict[str, Any]], None], done: dict[str, Any]) -> None:
        """Store a finished response, unless it was cancelled meanwhile."""
        stored = self.store.get(done["id"])
        if stored is None or stored["status"] in RUNNING:
            keep(done)

    def _set_status(self, response_id: str, status: str, error: str | None = None) -> None:
        stored = self.store.get(response_id)
        if stored is not None and stored["status"] in RUNNING:
            stored["status"] = status
            if error is not None:
                stored["error"] = {"code": "server_error", "message": error}

    async def _run(
        self,
        job: BackgroundJob,
        submit: Callable[[], Awaitable[RequestStream]],
        log: EventLog | None,
    ) -> None:
        stream: _Marked | None = None
        try:
            stream = _Marked(await submit(), lambda: self._set_status(job.id, "in_progress"))
            if log is None:
                job.keep(job.response(await last_output(stream)))
            else:
                async for event in job.events(stream):
                    log.append(event)
            self._set_status(job.id, "failed", job.error or "the response ended without an answer")
        except APIError as exc:
            self._set_status(job.id, "failed", exc.message)
        except Exception as exc:  # noqa: BLE001 - the task has no caller to raise to
            logger.exception("background response %s failed", job.id)
            self._set_status(job.id, "failed", str(exc))
        finally:
            if stream is not None:
                stream.abort()
            if log is not None:
                log.close()

    async def cancel(self, response_id: str) -> dict[str, Any]:
        """``POST /v1/responses/{id}/cancel``: stop a queued or in-progress background response.
        Cancelling a cancelled one answers it again (OpenAI: cancelling is idempotent); one that
        has finished, or was not a background one, is a 400 (as vLLM answers)."""
        response = self.store.get(response_id)
        if response is None:
            raise not_found(response_id)
        if response["status"] == "cancelled":
            return response
        task = self._tasks.get(response_id)
        if task is None or response["status"] not in RUNNING:
            raise bad_request(
                f"Response with id '{response_id}' cannot be cancelled: its status is "
                f"'{response['status']}'; only a queued or in-progress background response can be",
                param="response_id",
            )
        response["status"] = "cancelled"
        await _stopped(task)
        return response

    async def forget(self, response_id: str) -> None:
        """Stop a background response if it is still running and drop its events (its stored
        response is being deleted)."""
        task = self._tasks.get(response_id)
        if task is not None:
            await _stopped(task)
        self._logs.pop(response_id, None)

    def events(self, response_id: str, starting_after: int | None) -> AsyncIterator[bytes]:
        """``GET /v1/responses/{id}?stream=true``: the events of a streamed background response,
        after sequence number ``starting_after``."""
        if self.store.get(response_id) is None:
            raise not_found(response_id)
        log = self._logs.get(response_id)
        if log is None:
            raise bad_request(
                f"Response with id '{response_id}' has no events to stream: only a response "
                "created with both background and stream true can be streamed again",
                param="stream",
            )
        return log.read(-1 if starting_after is None else starting_after)

    async def shutdown(self) -> None:
        """Stop every background response (the server is going away, and the store with it)."""
        for response_id, task in list(self._tasks.items()):
            self._set_status(response_id, "cancelled")
            await _stopped(task)


async def _stopped(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait for it to end (its engine request aborted)."""
    task.cancel()
    await asyncio.wait({task})


def not_found(response_id: str) -> APIError:
    return APIError(404, f"Response with id '{response_id}' not found.", param="response_id")
