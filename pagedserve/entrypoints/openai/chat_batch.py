"""``POST /v1/chat/completions/batch`` (vLLM's): several conversations in one request, run
together, answered as one chat completion whose choice ``i`` answers conversation ``i``.

Each conversation is prepared, run and written as chat does it (its template, checks, reasoning
split, logprobs); the usage is the sum of the conversations'. As vLLM's, the answer carries no
prompt logprobs, so none are asked of the engine (an ``echo`` or a ``prompt_logprobs`` would):
they would cost a logits row per prompt token and keep the prompts out of the prefix cache. The
values are still checked, as chat checks them."""

from __future__ import annotations

import time
from dataclasses import replace
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.entrypoints.openai.chat_batch_protocol import BatchChatCompletionRequest
from pagedserve.entrypoints.openai.serving_base import new_id
from pagedserve.entrypoints.openai.serving_chat import ServingChat
from pagedserve.entrypoints.openai.streams import cancel_on_disconnect


def add_chat_batch_route(app: FastAPI, chat: ServingChat) -> None:
    s = chat.s

    @app.post("/v1/chat/completions/batch")
    async def create_batch_chat_completion(
        req: BatchChatCompletionRequest, raw: Request
    ) -> Response:
        singles = req.chat_requests()
        prepared = [await chat.prepare(single) for single in singles]
        first = singles[0]
        request_id = new_id("chatcmpl", given=raw.headers.get("x-request-id") or first.request_id)
        engine_id = new_id("chatcmpl")
        created = int(time.time())

        async def run() -> Response:
            prompts = [prompt_ids for prompt_ids, _ in prepared]
            params = [replace(p, prompt_logprobs=None) for _, p in prepared]
            finals = await s.final_outputs(engine_id, prompts, params, first, request_id)
            answers = [
                chat._response(single, request_id, created, final, single.num_logprobs)
                for single, final in zip(singles, finals, strict=True)
            ]
            return JSONResponse(_merged(answers))

        return await cancel_on_disconnect(raw, run)


def _merged(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """One chat completion of several: choice ``i`` is answer ``i``'s, the usage their sum."""
    choices = [{**answer["choices"][0], "index": i} for i, answer in enumerate(answers)]
    usage = answers[0]["usage"]
    for answer in answers[1:]:
        usage = _summed(usage, answer["usage"])
    merged = {**answers[0], "choices": choices, "usage": usage, "prompt_logprobs": None}
    merged.pop("prompt_token_ids", None)
    return merged


def _summed(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    return {k: _summed(v, b[k]) if isinstance(v, dict) else v + b[k] for k, v in a.items()}
