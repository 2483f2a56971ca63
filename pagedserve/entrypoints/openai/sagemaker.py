"""Amazon SageMaker's hosting contract, as vLLM serves it: ``GET``/``POST /ping`` is the health
check, and ``POST /invocations`` takes any request body the model serves and answers it as the
endpoint whose body it is (chat, then completions on a generating model; embeddings, or
classify, rerank and score on a pooling one), the first whose fields it fits."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import pydantic
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.request_body import RequestBody

Handler = Callable[[Any, Request], Awaitable[Response]]


def add_sagemaker_routes(
    app: FastAPI,
    health: Callable[[], Awaitable[Response]],
    handlers: Sequence[tuple[type[RequestBody], Handler]],
) -> None:
    """``handlers`` in order of preference: the first body type that validates is served."""

    @app.get("/ping")
    @app.post("/ping")
    async def ping() -> Response:
        return await health()

    @app.post("/invocations")
    async def invocations(raw: Request) -> Response:
        try:
            body = json.loads(await raw.body())
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise bad_request(f"the request body is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise bad_request("the request body must be a JSON object")
        closest: tuple[int, str] | None = None
        for body_type, handler in handlers:
            try:
                body_type.model_validate(body, context={"probe": True})
            except pydantic.ValidationError as exc:
                errors = exc.errors()
                first = errors[0]
                where = ".".join(str(p) for p in first["loc"]) or "body"
                reason = f"as {body_type.__name__}: {where}: {first['msg']}"
                if closest is None or len(errors) < closest[0]:
                    closest = (len(errors), reason)
                continue
            return await handler(body_type.model_validate(body), raw)
        names = ", ".join(t.__name__ for t, _ in handlers)
        detail = f"; closest {closest[1]}" if closest else ""
        raise bad_request(
            f"Cannot find suitable handler for request. Expected one of: {names}{detail}"
        )
