"""AsyncEngine's thread hand-off, aborts and failure handling, on a scripted stand-in engine.

The server tests run the real engine end to end; these pin down the concurrency contract
(never call the engine off its thread, abort frees at once, a failing step fails only the
requests in flight and the loop keeps serving) in isolation and in milliseconds.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

import pytest

from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError, EngineError
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.sampling_params import SamplingParams


@dataclass
class _Stats:
    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0


class ScriptedEngine:
    """Emits one token per step per request; fails the step when a request asks for it."""

    def __init__(self, step_seconds: float = 0.0) -> None:
        self.step_seconds = step_seconds
        self.requests: dict[str, tuple[int, int]] = {}  # id -> (tokens so far, max_tokens)
        self.thread: threading.Thread | None = None
        self.fail_next_step = False
        self.aborted: list[str] = []

    def _check_thread(self) -> None:
        if self.thread is None:
            self.thread = threading.current_thread()
        assert threading.current_thread() is self.thread, "engine called from two threads"

    def add_request(
        self,
        request_id,
        prompt,
        params,
        arrival_time=None,
        cache_salt=None,
        priority=0,
        lora_request=None,
    ) -> None:
        self._check_thread()
        if not prompt:
            raise ValueError("the prompt is empty")
        self.requests[request_id] = (0, params.max_tokens)

    def abort_request(self, request_ids) -> None:
        self._check_thread()
        for rid in request_ids:
            if self.requests.pop(rid, None) is not None:
                self.aborted.append(rid)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    def step(self) -> list[RequestOutput]:
        self._check_thread()
        time.sleep(self.step_seconds)
        if self.fail_next_step:
            self.fail_next_step = False
            raise RuntimeError("boom")
        outputs = []
        for rid, (done, limit) in list(self.requests.items()):
            done += 1
            finished = done >= limit
            text = "x" * done
            out = CompletionOutput(0, text, list(range(done)), None, None)
            if finished:
                out.finish_reason = "length"
                del self.requests[rid]
            else:
                self.requests[rid] = (done, limit)
            outputs.append(RequestOutput(rid, None, [1], [out], finished))
        return outputs

    def get_stats(self) -> _Stats:
        return _Stats(num_running=len(self.requests))


def _run(coro):
    return asyncio.run(asyncio.wait_for(coro, timeout=20))


def test_stream_yields_cumulative_outputs_until_finished() -> None:
    async def main() -> None:
        engine = AsyncEngine(ScriptedEngine())
        engine.start()
        stream = await engine.add_request("a", [1, 2], SamplingParams(max_tokens=5))
        outs = [out async for out in stream]
        assert outs[-1].finished and outs[-1].outputs[0].text == "xxxxx"
        texts = [o.outputs[0].text for o in outs]
        assert texts == sorted(texts, key=len)  # append-only, maybe coalesced
        assert engine.num_in_flight() == 0
        engine.shutdown()

    _run(main())


def test_refused_request_raises_value_error_and_leaves_nothing() -> None:
    async def main() -> None:
        engine = AsyncEngine(ScriptedEngine())
        engine.start()
        with pytest.raises(ValueError, match="empty"):
            await engine.add_request("a", [], SamplingParams())
        assert engine.num_in_flight() == 0
        engine.shutdown()

    _run(main())


def test_abort_frees_the_request_in_the_engine() -> None:
    async def main() -> None:
        inner = ScriptedEngine()
        engine = AsyncEngine(inner)
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=10_000))
        first = await stream.__anext__()
        assert not first.finished
        await stream.aclose()
        for _ in range(200):
            if not inner.requests:
                break
            await asyncio.sleep(0.01)
        assert inner.aborted == ["a"] and not inner.requests
        assert engine.num_in_flight() == 0
        engine.shutdown()

    _run(main())


def test_failing_step_fails_requests_in_flight_and_keeps_serving() -> None:
    async def main() -> None:
        inner = ScriptedEngine()
        engine = AsyncEngine(inner)
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=10_000))
        await stream.__anext__()
        inner.fail_next_step = True
        with pytest.raises(EngineError):
            async for _ in stream:
                pass
        assert not inner.requests  # the failed request was aborted in the engine
        again = await engine.add_request("b", [1], SamplingParams(max_tokens=3))
        outs = [out async for out in again]
        assert outs[-1].finished and outs[-1].outputs[0].text == "xxx"
        engine.shutdown()

    _run(main())


def test_cancelled_consumer_aborts_its_request() -> None:
    async def main() -> None:
        inner = ScriptedEngine(step_seconds=0.005)
        engine = AsyncEngine(inner)
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=10_000))

        async def consume() -> None:
            async for _ in stream:
                pass

        task = asyncio.create_task(consume())
        await asyncio.sleep(0.05)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if not inner.requests:
                break
            await asyncio.sleep(0.01)
        assert inner.aborted == ["a"]
        engine.shutdown()

    _run(main())


def test_shutdown_ends_streams_in_flight_and_refuses_new_requests() -> None:
    async def main() -> None:
        engine = AsyncEngine(ScriptedEngine(step_seconds=0.005))
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=10_000))
        await stream.__anext__()
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            async for _ in stream:
                pass
        with pytest.raises(EngineDeadError):
            await engine.add_request("b", [1], SamplingParams())

    _run(main())


class _BuiltOnItsThread(ScriptedEngine):
    """Records the thread that built it: it must be the one that steps it."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.current_thread()


def test_built_engine_is_made_and_stepped_on_one_thread() -> None:
    async def main() -> None:
        engine = AsyncEngine.built(_BuiltOnItsThread)
        inner = engine.engine
        assert inner.thread is not threading.current_thread()
        assert not engine.is_running  # nothing runs before start()
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=3))
        outs = [out async for out in stream]
        assert outs[-1].finished  # every step passed ScriptedEngine's same-thread check
        engine.shutdown()
        assert not inner.thread.is_alive()

    _run(main())


def test_built_reraises_what_building_raised() -> None:
    def broken() -> ScriptedEngine:
        raise SystemExit("error: no such model")

    with pytest.raises(SystemExit, match="no such model"):
        AsyncEngine.built(broken)


def test_built_engine_shut_down_before_start_ends_its_thread() -> None:
    engine = AsyncEngine.built(_BuiltOnItsThread)
    thread = engine.engine.thread
    engine.shutdown()
    assert not thread.is_alive()


def test_call_runs_on_the_engine_thread_between_steps() -> None:
    async def main() -> None:
        inner = ScriptedEngine(step_seconds=0.002)
        engine = AsyncEngine(inner)
        engine.start()
        stream = await engine.add_request("a", [1], SamplingParams(max_tokens=50))

        def on_engine_thread(e: ScriptedEngine) -> str:
            e._check_thread()  # the same thread that steps
            return f"{len(e.requests)} running"

        assert await engine.call(on_engine_thread) == "1 running"

        def fails(_: ScriptedEngine) -> None:
            raise ValueError("refused")

        with pytest.raises(ValueError, match="refused"):
            await engine.call(fails)
        outs = [out async for out in stream]  # the request went on meanwhile
        assert outs[-1].finished and len(outs[-1].outputs[0].text) == 50
        engine.shutdown()
        with pytest.raises(EngineDeadError):
            await engine.call(on_engine_thread)

    _run(main())
