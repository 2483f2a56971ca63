"""vLLM's runtime adapter endpoints: ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter``, on a server with ``--enable-lora`` whose environment allows them
(``PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING=1``, or vLLM's ``VLLM_ALLOW_RUNTIME_LORA_UPDATING``):
they read adapter directories from the server's disk, so they are off by default."""

from __future__ import annotations

import asyncio
import itertools
import os

from fastapi import FastAPI
from starlette.responses import PlainTextResponse

from pagedserve.entrypoints.openai.errors import APIError, bad_request
from pagedserve.entrypoints.openai.request_body import RequestBody
from pagedserve.entrypoints.openai.serving_base import OpenAIServing
from pagedserve.lora.request import LoRARequest

_ENV = ("PAGEDSERVE_ALLOW_RUNTIME_LORA_UPDATING", "VLLM_ALLOW_RUNTIME_LORA_UPDATING")


def runtime_lora_updating() -> bool:
    """Whether the environment allows loading and unloading adapters over HTTP."""
    return any(os.environ.get(name, "").lower() in ("1", "true") for name in _ENV)


class LoadLoRAAdapterRequest(RequestBody):
    lora_name: str
    lora_path: str


class UnloadLoRAAdapterRequest(RequestBody):
    lora_name: str


def add_lora_routes(app: FastAPI, serving: OpenAIServing) -> None:
    ids = itertools.count(len(serving.lora_modules) + 1)
    # One load or unload at a time: each checks the served names, then waits for the engine,
    # and two loads of one name would both pass the check.
    lock = asyncio.Lock()

    @app.post("/v1/load_lora_adapter")
    async def load_lora_adapter(req: LoadLoRAAdapterRequest) -> PlainTextResponse:
        name = req.lora_name
        if not name or not req.lora_path:
            raise bad_request("Both 'lora_name' and 'lora_path' must be provided.", "lora_name")
        if name in serving.served_model_names:
            raise bad_request(
                f"The lora adapter '{name}' conflicts with a served base model.", "lora_name"
            )
        async with lock:
            if name in serving.lora_modules:
                raise bad_request(
                    f"The lora adapter '{name}' has already been loaded.", "lora_name"
                )
            lora = LoRARequest(name, next(ids), req.lora_path)
            try:
                await serving.engine.call(lambda engine: engine.loras.load(lora))
            except ValueError as exc:
                raise bad_request(str(exc), "lora_path") from exc
            serving.lora_modules[name] = lora
        return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora_adapter(req: UnloadLoRAAdapterRequest) -> PlainTextResponse:
        name = req.lora_name
        async with lock:
            if name not in serving.lora_modules:
                raise APIError(
                    404, f"The lora adapter '{name}' cannot be found.", param="lora_name"
                )
            # Requests already running with it finish on it; the ones routed to it but not yet
            # started are refused with a 404 (see LoRAManager), as the name now is.
            await serving.engine.call(lambda engine: engine.remove_lora(name))
            del serving.lora_modules[name]
        return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
