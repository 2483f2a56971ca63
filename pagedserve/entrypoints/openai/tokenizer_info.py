"""``GET /tokenizer_info``: the tokenizer's configuration, as its ``tokenizer_config.json``
holds it, for a client that tokenizes on its own side (vLLM's, behind the same flag,
``--enable-tokenizer-info-endpoint``: it shows the chat template, so it is off by default)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse

from pagedserve.engine.async_engine import AsyncEngine

_LOCAL_FILES = ("vocab_file", "merges_file")  # paths on the server's disk, not configuration


def tokenizer_info(tokenizer: Any) -> dict[str, Any]:
    """The arguments the tokenizer was made with, less its files, in JSON (a special token as
    its text), with its class and the chat template the server renders with."""
    config = dict(getattr(tokenizer, "init_kwargs", None) or {})
    for name in _LOCAL_FILES:
        config.pop(name, None)
    info = _json_safe(config)
    info["tokenizer_class"] = type(tokenizer).__name__
    template = getattr(tokenizer, "chat_template", None)
    if template:
        info["chat_template"] = template
    return info


def _json_safe(value: Any) -> Any:
    if hasattr(value, "content"):  # transformers' AddedToken
        return value.content
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set):
        return [_json_safe(v) for v in value]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    return str(value)


def add_tokenizer_info_route(app: FastAPI, engine: AsyncEngine) -> None:
    @app.get("/tokenizer_info")
    async def get_tokenizer_info() -> JSONResponse:
        return JSONResponse(tokenizer_info(engine.tokenizer))
