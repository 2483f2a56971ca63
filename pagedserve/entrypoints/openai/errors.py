"""Errors in the OpenAI schema: ``{"error": {"message", "type", "param", "code"}}``.

Every failure the server reports, whatever raised it (our checks, pydantic, the engine, Starlette's
routing), leaves through these handlers, so clients see one shape and the right status.
"""

from __future__ import annotations

import json
import logging
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse, Response

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to return to the client with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or _TYPE_BY_STATUS.get(status, "server_error")

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


def error_body(message: str, type: str, param: str | None = None, code: Any = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def error_bytes(exc: APIError) -> bytes:
    return json.dumps(exc.body()).encode()


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


_LEADING_NAME = re.compile(r"^([a-z_]+) ")


def from_value_error(exc: ValueError, known_params: set[str] | None = None) -> APIError:
    """A 400 for a ``ValueError`` (SamplingParams and the engine name the field first)."""
    message = str(exc) or "invalid request"
    match = _LEADING_NAME.match(message)
    param = (
        match.group(1)
        if match and (known_params is None or match.group(1) in known_params)
        else None
    )
    return bad_request(message, param=param)


_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    first = errors[0]
    loc = [str(p) for p in first.get("loc", ())]
    if loc[:1] and loc[0] in _LOCATIONS:  # where FastAPI read it; the parameter comes next
        loc = loc[1:]
    if first.get("type") == "json_invalid":
        return "the request body is not valid JSON", None
    if not loc and first.get("type") == "missing":
        return "the request body is missing or is not a JSON object", None
    where = ".".join(loc)
    message = f"{where}: {first.get('msg', 'invalid value')}" if where else first.get("msg", "")
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more error(s))"
    return message, (loc[0] if loc else None)


def install_error_handlers(app: FastAPI) -> None:
    """Route every error the app can raise to an OpenAI-shaped response."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> Response:
        message, param = _validation_message(exc)
        return bad_request(message, param=param).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        response = APIError(exc.status_code, str(exc.detail)).response()
        response.headers.update(exc.headers or {})  # a 405's Allow
        return response

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> Response:
        return internal_error(exc)


def internal_error(exc: Exception) -> Response:
    """The 500 for an exception no handler took, logged with its traceback."""
    logger.error("unhandled error while serving a request", exc_info=exc)
    return APIError(500, f"internal server error: {type(exc).__name__}").response()
