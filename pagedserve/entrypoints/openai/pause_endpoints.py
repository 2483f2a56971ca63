"""vLLM's endpoints to pause the engine and abort its requests: ``POST /pause``, ``POST
/resume``, ``GET /is_paused`` and ``POST /abort_requests``, on a server in vLLM's dev mode
(``VLLM_SERVER_DEV_MODE=1``, or ``PAGEDSERVE_SERVER_DEV_MODE=1``), as vLLM serves them.

``/pause?mode=abort|wait|keep&clear_cache=true`` answers once the pause is in place: new
requests wait (they are answered after ``/resume``), and the ones in flight are aborted
(``abort``, the default), run to their end (``wait``) or frozen with their KV blocks (``keep``).
An aborted request ends with ``finish_reason`` ``"abort"``."""

from __future__ import annotations

from typing import Literal

from fastapi import FastAPI

from pagedserve.engine.async_engine import AsyncEngine, EngineDeadError
from pagedserve.entrypoints.openai.errors import APIError
from pagedserve.entrypoints.openai.pause_protocol import AbortRequestsRequest


def add_pause_routes(app: FastAPI, engine: AsyncEngine) -> None:
    @app.post("/pause")
    async def pause(
        mode: Literal["abort", "wait", "keep"] = "abort", clear_cache: bool = True
    ) -> dict[str, str]:
        try:
            await engine.pause(mode, clear_cache)
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        return {"status": "paused"}

    @app.post("/resume")
    async def resume() -> dict[str, str]:
        try:
            await engine.resume()
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc
        return {"status": "resumed"}

    @app.get("/is_paused")
    async def is_paused() -> dict[str, bool]:
        return {"is_paused": engine.is_paused}

    @app.post("/abort_requests")
    async def abort_requests(req: AbortRequestsRequest) -> dict[str, str | int]:
        return {"status": "aborted", "aborted": engine.abort_requests(req.ids())}
