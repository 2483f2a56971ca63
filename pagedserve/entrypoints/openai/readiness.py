"""``GET /ready`` and ``GET /readyz``: the readiness probes of vLLM's launcher (Kubernetes'
``readinessProbe`` names them), open without an API key as ``/health`` is.

The server listens only once the model is loaded (a probe before that finds no server), so here
ready means what ``/health`` means: 200 while the engine runs, a 503 once it has stopped."""

from __future__ import annotations

from fastapi import FastAPI
from starlette.responses import Response

from pagedserve.engine.async_engine import AsyncEngine
from pagedserve.entrypoints.openai.errors import APIError

PROBE_PATHS = ("/ready", "/readyz")


def add_readiness_routes(app: FastAPI, engine: AsyncEngine) -> None:
    async def ready() -> Response:
        if not engine.is_running:
            return APIError(503, "the engine is not running").response()
        return Response(status_code=200)

    for path in PROBE_PATHS:
        app.add_api_route(path, ready, methods=["GET"], include_in_schema=False)
