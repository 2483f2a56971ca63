"""The engine loop in a background thread, with one async output stream per request.

``LLMEngine`` is synchronous and not thread safe. ``AsyncEngine`` owns it on a single engine
thread: that thread steps the engine while there is work and sleeps when there is none. The event
loop never calls into the engine; it posts commands (add, abort) that the engine thread runs
between steps, and the engine thread hands each step's outputs back to the event loop in one
``call_soon_threadsafe`` call. So a slow HTTP client never delays the batch, and the interface
(``add_request`` -> async iterator, ``abort``, ``get_stats``) stays narrow enough to move the engine
into its own process later.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, Protocol, TypeVar

from pagedserve.engine.pausing import PauseControl, PauseGate, aborted_output
from pagedserve.lora.request import LoRARequest
from pagedserve.model.pooler import PoolerConfig
from pagedserve.outputs import EmbeddingRequestOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams

T = TypeVar("T")

logger = logging.getLogger(__name__)


class EngineObserver(Protocol):
    """Told, on the event loop, about each step's outputs and each abort (metrics use this)."""

    def on_outputs(
        self, outputs: list[RequestOutput] | list[EmbeddingRequestOutput], now: float
    ) -> None: ...

    def on_abort(self, request_id: str) -> None: ...


class EngineError(RuntimeError):
    """The engine failed while running a request; the request is over."""


class EngineDeadError(EngineError):
    """The engine loop is not running (shut down, or never started)."""


_FINISHED = object()  # pushed into a stream's queue when the request ends without a final output


class RequestStream(AsyncIterator[RequestOutput]):
    """The outputs of one request, in order, as an async iterator.

    Outputs are cumulative, so the stream keeps only the newest one: a consumer that falls
    behind skips to it (a streamer then sends a bigger delta) and memory stays bounded. Leaving
    the iteration early (``aclose``, cancellation while waiting) aborts the request.
    """

    def __init__(
        self,
        request_id: str,
        engine: AsyncEngine,
        client_id: str | None = None,
        prompt: str | list[int] | None = None,
        params: Any = None,
    ) -> None:
        self.request_id = request_id
        self.client_id = client_id or request_id  # the id its client knows (an answer's id)
        self._engine = engine
        self._item: Any = None  # newest output, an exception, or _FINISHED
        self._ready = asyncio.Event()
        self.finished = False
        self._prompt_ids = prompt if isinstance(prompt, list) else []
        self._params = params
        self._last: RequestOutput | None = None  # the newest output, for a server-side abort

    def _put(self, item: Any) -> None:
        if isinstance(item, RequestOutput):
            self._last = item
        self._item = item
        self._ready.set()

    def _aborted(self) -> Any:
        """The item that ends this stream when the server aborts it."""
        out = aborted_output(self.request_id, self._last, self._prompt_ids, self._params)
        return _FINISHED if out is None else out

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        while self._item is None:
            self._ready.clear()
            try:
                await self._ready.wait()
            except asyncio.CancelledError:
                self.abort()
                raise
        item, self._item = self._item, None
        if item is _FINISHED:
            self.finished = True
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        if item.finished:
            self.finished = True
        return item

    def abort(self) -> None:
        """Abort the request if it is still running (idempotent; call on the event loop)."""
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)

    async def aclose(self) -> None:
        self.abort()


class AsyncEngine(PauseControl):
    """Runs an ``LLMEngine`` on its own thread and serves per-request async streams.

    Create it (``built()`` for a real engine, so that loading and stepping share one thread),
    ``start()`` it from the event loop that will consume the streams, then call ``add_request``
    from that loop.
    """

    def __init__(self, engine: Any, observer: EngineObserver | None = None) -> None:
        self.engine = engine
        self.observer = observer
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cond = threading.Condition()
        self._commands: list[tuple[str, Any]] = []
        self._streams: dict[str, RequestStream] = {}
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._live: set[str] = set()  # engine thread only: ids the engine holds
        self._stats = engine.get_stats()
        self._go: threading.Event | None = None  # set by start(): a built() engine's thread runs
        self._gate = PauseGate()  # engine thread only
        self._paused = False

    @classmethod
    def built(
        cls, make_engine: Callable[[], Any], observer: EngineObserver | None = None
    ) -> AsyncEngine:
        """Build the engine with ``make_engine()`` on the thread that will step it (blocks until
        it is built; re-raises what ``make_engine`` raised).

        Loading runs parallel torch ops, and libgomp keeps a worker pool for every thread that
        ran some. With the loading thread's pool alive beside the engine thread's, it counts more
        OpenMP threads than cores and lets idle workers sleep at once instead of spinning, so
        every parallel region pays a futex wake-up: at batch 1 (about 300 regions a step) that
        took single-stream decode from 17.7 to 23.8 ms a token. One thread, one pool.
        """
        built = threading.Event()
        go = threading.Event()
        box: dict[str, Any] = {}

        def host() -> None:
            try:
                box["engine"] = make_engine()
            except BaseException as exc:  # noqa: BLE001 - handed to the building thread
                box["error"] = exc
                return
            finally:
                built.set()
            go.wait()
            box["self"]._run()

        thread = threading.Thread(target=host, name="pagedserve-engine", daemon=True)
        thread.start()
        built.wait()
        if "error" in box:
            thread.join()
            raise box["error"]
        self = cls(box["engine"], observer)
        self._thread, self._go = thread, go
        box["self"] = self
        return self

    # ---- read-only facts about the model (safe from any thread) ----
    @property
    def tokenizer(self) -> Any:
        return self.engine.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.engine.max_model_len

    @property
    def max_logprobs(self) -> int:
        return self.engine.max_logprobs

    @property
    def eos_token_ids(self) -> set[int]:
        return self.engine.eos_token_ids

    @property
    def scheduling_policy(self) -> str:
        return self.engine.scheduler.policy

    @property
    def sampling_defaults(self) -> dict[str, Any]:
        """The model's generation-config sampling defaults (see ``generation_config``)."""
        return self.engine.generation_config.sampling_defaults

    @property
    def model_name(self) -> str:
        return self.engine.model_name

    @property
    def is_classifier(self) -> bool:
        return self.engine.is_classifier

    @property
    def class_labels(self) -> dict[int, str]:
        """A classifier's label names by class index (its config's ``id2label``)."""
        return dict(getattr(self.engine.model.config, "id2label", None) or {})

    @property
    def pooler(self) -> PoolerConfig | None:
        """How a pooling engine embeds; None where the engine generates."""
        return self.engine.pooler

    @property
    def is_running(self) -> bool:
        return (
            self._loop is not None
            and self._thread is not None
            and self._thread.is_alive()
            and not self._stopping
        )

    def get_stats(self) -> Any:
        """The engine's stats as of the end of its latest step or command."""
        return self._stats

    def num_in_flight(self) -> int:
        return len(self._streams)

    # ---- life cycle ----
    def start(self) -> None:
        """Start the engine thread; call from the event loop that consumes the streams."""
        if self._loop is not None:
            return
        self._loop = asyncio.get_running_loop()
        if self._go is not None:
            self._go.set()
            return
        self._thread = threading.Thread(target=self._run, name="pagedserve-engine", daemon=True)
        self._thread.start()

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is in flight, at most ``timeout`` seconds; True if idle."""
        deadline = time.monotonic() + timeout
        while self._streams and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return not self._streams

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the engine thread, failing whatever is still in flight."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._go is not None:
            self._go.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)
        error = EngineDeadError("the server is shutting down")
        with self._cond:
            pending, self._commands = self._commands, []
        for kind, payload in pending:
            if kind == "add":
                _settle(payload[-1], error)
        for add in self._gate.held:  # the engine thread is gone: nothing else touches the gate
            _settle(add[-1], error)
        for done in self._gate.waiting:
            _settle(done, error)
        for stream in list(self._streams.values()):
            stream._put(error)
        self._streams.clear()

    # ---- requests (event loop side) ----
    async def add_request(
        self,
        request_id: str,
        prompt: str | list[int],
        params: SamplingParams,
        arrival_time: float | None = None,
        cache_salt: str | None = None,
        priority: int = 0,
        lora_request: LoRARequest | None = None,
        client_id: str | None = None,
    ) -> RequestStream:
        """Submit a request; returns its output stream once the engine has accepted it (while
        the engine is paused, once it resumes). ``client_id``: the id its client knows it by,
        which ``abort_requests`` takes too.

        Raises ``ValueError`` (the engine's own message) when the engine refuses the request, and
        ``EngineDeadError`` when the engine is not running.
        """
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        if request_id in self._streams:
            raise ValueError(f"request id {request_id!r} is already in use")
        assert self._loop is not None
        stream = RequestStream(request_id, self, client_id, prompt, params)
        accepted: asyncio.Future[None] = self._loop.create_future()
        self._streams[request_id] = stream
        arrival = arrival_time or time.time()
        self._post(
            "add",
            (request_id, prompt, params, arrival, cache_salt, priority, lora_request, accepted),
        )
        try:
            await accepted
        except BaseException:
            self._streams.pop(request_id, None)
            refused = accepted.done() and not accepted.cancelled() and accepted.exception()
            if not refused:  # the caller went away while waiting: the add may still happen
                self._post("abort", [request_id])
            raise
        return stream

    async def call(self, function: Callable[[Any], T]) -> T:
        """``function(engine)`` on the engine thread, between two steps (so it never runs
        beside a forward pass); its result or its exception."""
        if not self.is_running:
            raise EngineDeadError("the engine is not running")
        assert self._loop is not None
        done: asyncio.Future[T] = self._loop.create_future()
        self._post("call", (function, done))
        return await done

    def abort(self, request_id: str) -> None:
        """Abort a request; the engine frees its blocks before its next step.

        Call from the event loop (the engine thread only ever sees the posted command).
        """
        stream = self._streams.pop(request_id, None)
        if stream is not None:
            stream.finished = True
            stream._put(_FINISHED)
            if self.observer is not None:
                self.observer.on_abort(request_id)
        self._post("abort", [request_id])

    def _post(self, kind: str, payload: Any) -> None:
        with self._cond:
            self._commands.append((kind, payload))
            self._cond.notify()

    # ---- engine thread ----
    def _run(self) -> None:
        engine = self.engine
        has_work = False
        while True:
            with self._cond:
                while not self._commands and not has_work and not self._stopping:
                    self._cond.wait()
                if self._stopping:
                    return
                commands, self._commands = self._commands, []
            try:
                self._run_commands(commands)
                if engine.has_unfinished_requests() and not self._gate.frozen:
                    self._step()
                has_work = engine.has_unfinished_requests() and not self._gate.frozen
                drained = self._gate.settle(engine)
                # The stats first: a pause call answered now must see the engine drained.
                self._stats = self._gate.counted(engine.get_stats())
                for done in drained:
                    self._call_in_loop(_settle, done, None)
            except Exception as exc:  # noqa: BLE001 - the loop must survive an engine failure
                logger.exception("the engine failed; failing the requests in flight")
                self._fail_all(exc)
                has_work = False

    def _run_commands(self, commands: list[tuple[str, Any]]) -> None:
        aborts: list[str] = []
        for kind, payload in commands:
            if kind == "abort":
                aborts.extend(payload)
                continue
            if kind == "call":  # after the aborts posted before it (its caller may count on them)
                self._abort(aborts)
                aborts = []
                function, done = payload
                try:
                    result = function(self.engine)
                except Exception as exc:  # noqa: BLE001 - handed to the caller
                    self._call_in_loop(_settle, done, exc)
                else:
                    self._call_in_loop(_resolve, done, result)
                continue
            if not self._gate.hold(payload):
                self._add(payload)
        self._abort(aborts)

    def _add(self, payload: tuple[Any, ...]) -> None:
        request_id, prompt, params, arrival, cache_salt, priority, lora, accepted = payload
        try:
            self.engine.add_request(
                request_id,
                prompt,
                params,
                arrival_time=arrival,
                cache_salt=cache_salt,
                priority=priority,
                lora_request=lora,
            )
        except Exception as exc:  # noqa: BLE001 - handed to the caller, who maps it to HTTP
            self._call_in_loop(_settle, accepted, exc)
        else:
            self._live.add(request_id)
            self._call_in_loop(_settle, accepted, None)

    def _abort(self, request_ids: list[str]) -> None:
        if request_ids:
            self._live.difference_update(request_ids)
            self.engine.abort_request(request_ids)
            # A held request was never added: its caller gets its stream, already ended.
            for add in self._gate.drop(request_ids):
                self._call_in_loop(_settle, add[-1], None)

    def _step(self) -> None:
        outputs = self.engine.step()
        if outputs:
            for out in outputs:
                if out.finished:
                    self._live.discard(out.request_id)
            self._call_in_loop(self._dispatch, outputs)

    def _fail_all(self, exc: Exception) -> None:
        """Abort every request the engine holds and tell their streams why."""
        error = EngineError(f"the engine failed while running this request: {exc!r}")
        ids, self._live = list(self._live), set()
        # Aborted first, so that a client told of the failure finds its blocks already freed.
        try:
            self.engine.abort_request(ids)
        except Exception:  # noqa: BLE001
            logger.exception("aborting the failed requests also failed")
        self._call_in_loop(self._fail_streams, ids, error)

    def _call_in_loop(self, fn: Callable[..., None], *args: Any) -> None:
        assert self._loop is not None
        try:
            self._loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass

    # ---- event loop side of the hand-off ----
    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        if self.observer is not None:
            try:
                self.observer.on_outputs(outputs, time.time())
            except Exception:  # noqa: BLE001 - metrics must never break serving
                logger.exception("output observer failed")
        streams = self._streams
        for out in outputs:
            stream = streams.get(out.request_id)
            if stream is None:
                continue
            stream._put(out)
            if out.finished:
                del streams[out.request_id]

    def _fail_streams(self, request_ids: list[str], error: EngineError) -> None:
        for request_id in request_ids:
            stream = self._streams.pop(request_id, None)
            if stream is not None:
                stream._put(error)


def _resolve(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _settle(future: asyncio.Future[None], exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(None)
    else:
        future.set_exception(exc)
