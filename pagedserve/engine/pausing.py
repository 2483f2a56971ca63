"""Pausing the engine and aborting its requests from the server's side (vLLM's ``/pause``,
``/resume`` and ``/abort_requests``), for ``AsyncEngine``.

A pause holds every request that arrives until the resume, and treats the ones in flight by its
mode, as vLLM's: ``abort`` ends them at once, ``wait`` lets them run to their end, ``keep``
freezes them where they are (their KV blocks kept) until the resume. A request the server aborts
ends with vLLM's ``finish_reason`` ``"abort"``, its text so far kept."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection
from dataclasses import replace
from typing import Any

from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

PAUSE_MODES = ("abort", "wait", "keep")


class PauseGate:
    """The engine thread's side of a pause: its mode, the requests held back, and the pause
    calls still waiting for the engine to drain. Only the engine thread touches it (and
    ``AsyncEngine.shutdown``, once that thread is gone)."""

    def __init__(self) -> None:
        self.mode: str | None = None  # None: not paused
        self.clear_cache = False
        self.held: list[tuple[Any, ...]] = []  # add commands, in arrival order
        self.waiting: list[asyncio.Future[None]] = []

    @property
    def frozen(self) -> bool:
        """No step runs: the requests in flight keep their place and their blocks."""
        return self.mode == "keep"

    def hold(self, add: tuple[Any, ...]) -> bool:
        """Keep an add command for the resume, if paused."""
        if self.mode is None:
            return False
        self.held.append(add)
        return True

    def drop(self, request_ids: list[str]) -> list[tuple[Any, ...]]:
        """The held adds of these requests, no longer held."""
        ids = set(request_ids)
        dropped = [add for add in self.held if add[0] in ids]
        self.held = [add for add in self.held if add[0] not in ids]
        return dropped

    def pause(self, mode: str, clear_cache: bool, done: asyncio.Future[None]) -> None:
        self.mode, self.clear_cache = mode, clear_cache
        self.waiting.append(done)

    def resume(self) -> tuple[list[tuple[Any, ...]], list[asyncio.Future[None]]]:
        """(the held adds, to add now; the pause calls still waiting, answered by the resume)."""
        held, self.held = self.held, []
        waiting, self.waiting = self.waiting, []
        self.mode = None
        return held, waiting

    def counted(self, stats: Any) -> Any:
        """The engine's stats with the held requests among the waiting (as vLLM's scheduler
        queues them)."""
        return (
            replace(stats, num_waiting=stats.num_waiting + len(self.held)) if self.held else stats
        )

    def settle(self, engine: Any) -> list[asyncio.Future[None]]:
        """The pause calls answered now: once nothing runs (a kept pause at once), after
        forgetting the cached prefixes if asked."""
        if not self.waiting or (self.mode == "wait" and engine.has_unfinished_requests()):
            return []
        if self.clear_cache and self.mode in ("abort", "wait"):
            engine.reset_prefix_cache()
        done, self.waiting = self.waiting, []
        return done


def aborted_output(
    request_id: str, last: RequestOutput | None, prompt_ids: list[int], params: Any
) -> RequestOutput | None:
    """What a request the server aborts ends with: its newest output finished, each unfinished
    sequence with ``finish_reason`` ``"abort"`` (an empty one before any output); None for a
    pooling request, which has nothing partial to show."""
    if last is not None:
        outputs = [replace(c, finish_reason=c.finish_reason or "abort") for c in last.outputs]
        return replace(last, outputs=outputs, finished=True)
    if not isinstance(params, SamplingParams):
        return None
    outputs = [CompletionOutput(i, "", [], None, None, "abort") for i in range(params.n)]
    return RequestOutput(request_id, None, prompt_ids, outputs, finished=True)


class PauseControl:
    """``AsyncEngine``'s pause, resume and server-side aborts (the methods it lends its host)."""

    _gate: PauseGate
    _paused: bool
    _streams: dict[str, Any]
    _live: set[str]
    observer: Any
    call: Callable[[Callable[[Any], Any]], Awaitable[Any]]
    _post: Callable[[str, Any], None]
    _abort: Callable[[list[str]], None]
    _add: Callable[[tuple[Any, ...]], None]
    _call_in_loop: Callable[..., None]

    @property
    def is_paused(self) -> bool:
        return self._paused

    def abort_requests(self, ids: Collection[str] | None = None) -> int:
        """Abort the requests named by their id or their client's id (all of them: None); their
        streams end with ``finish_reason`` ``"abort"``. Returns how many there were."""
        chosen = [
            s
            for s in self._streams.values()
            if ids is None or s.request_id in ids or s.client_id in ids
        ]
        for stream in chosen:
            del self._streams[stream.request_id]
            stream._put(stream._aborted())
            if self.observer is not None:
                self.observer.on_abort(stream.request_id)
        if chosen:
            self._post("abort", [s.request_id for s in chosen])
        return len(chosen)

    async def pause(self, mode: str = "abort", clear_cache: bool = True) -> None:
        """Hold new requests until ``resume``; those in flight are aborted (``abort``), run to
        their end (``wait``: returns once they have) or frozen (``keep``). ``clear_cache``:
        forget the cached prefixes once nothing runs (not with ``keep``). Raises
        ``EngineDeadError`` when the engine is not running."""
        if mode not in PAUSE_MODES:
            raise ValueError(f"mode must be one of {', '.join(PAUSE_MODES)}, got {mode!r}")
        drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.call(lambda _: self._pause_now(mode, clear_cache, drained))
        self._paused = True
        if mode == "abort":  # after the gate closed, so that no request slips past both
            self.abort_requests()
        await drained

    async def resume(self) -> None:
        """Run what a pause held back or froze (nothing to do when not paused)."""
        await self.call(lambda _: self._resume_now())
        self._paused = False

    # ---- engine thread ----
    def _pause_now(self, mode: str, clear_cache: bool, drained: asyncio.Future[None]) -> None:
        if mode == "abort":  # their streams are ended on the event loop next
            self._abort(list(self._live))
        self._gate.pause(mode, clear_cache, drained)

    def _resume_now(self) -> None:
        held, waiting = self._gate.resume()
        for add in held:
            self._add(add)
        for done in waiting:
            self._call_in_loop(_resolved, done)


def _resolved(done: asyncio.Future[None]) -> None:
    if not done.done():
        done.set_result(None)
