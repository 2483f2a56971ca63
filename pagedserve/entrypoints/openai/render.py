"""vLLM's render endpoints: ``POST /v1/chat/completions/render``, ``/v1/completions/render``
and ``/v1/messages/render`` answer what the request would run, without running it: its prompt
in token ids and its sampling parameters, as vLLM's ``GenerateRequest`` carries them (one per
prompt for completions).

The request goes through the endpoint's own preparation (checks, chat template, tokenizer,
limits), so a request that would fail fails here the same way. As in vLLM, these belong to the
scale-out endpoints: off unless the server starts with ``--enable-scale-out``, a 403 before."""

from __future__ import annotations

import dataclasses
from typing import Any

from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import JSONResponse

from pagedserve.entrypoints.anthropic.protocol import MessagesRequest
from pagedserve.entrypoints.anthropic.serving import ServingMessages
from pagedserve.entrypoints.openai.errors import APIError, bad_request
from pagedserve.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    SamplingFields,
)
from pagedserve.entrypoints.openai.serving_base import new_id
from pagedserve.entrypoints.openai.serving_chat import ServingChat
from pagedserve.entrypoints.openai.serving_completion import ServingCompletion
from pagedserve.sampling_params import SamplingParams

RENDER_PATHS = (
    "/v1/chat/completions/render",
    "/v1/completions/render",
    "/v1/messages/render",
)


def generate_request(
    request_id: str,
    prompt_ids: list[int],
    params: SamplingParams,
    req: SamplingFields,
    offsets: list[tuple[int, int]] | None = None,
) -> dict[str, Any]:
    """One prompt to run, in the fields of vLLM's ``GenerateRequest`` that apply here."""
    return {
        "request_id": request_id,
        "token_ids": prompt_ids,
        "token_offsets": offsets,
        "features": None,
        "sampling_params": sampling_params_json(params),
        "model": req.model,
        "stream": bool(req.stream),
        "stream_options": req.stream_options.model_dump() if req.stream_options else None,
        "cache_salt": req.cache_salt,
        "priority": req.priority,
    }


def token_offsets(
    tokenizer: Any, text: str | None, ids: list[int], req: SamplingFields, add_special: bool
) -> list[tuple[int, int]] | None:
    """vLLM's ``return_token_offsets``: each prompt token's (start, end) characters in ``text``,
    the text it was tokenized from (a chat's as its template wrote it); None unless asked, for a
    prompt given as token ids, or where the tokenizer has no offsets (as vLLM: a fast one only).
    A truncated prompt keeps the offsets of the tokens it kept."""
    if not req.return_token_offsets or text is None or not getattr(tokenizer, "is_fast", False):
        return None
    encoded = tokenizer(text, add_special_tokens=add_special, return_offsets_mapping=True)
    all_ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    start = 0 if req.truncation_side == "right" else len(all_ids) - len(ids)
    if all_ids[start : start + len(ids)] != ids:
        return None
    return [(int(s), int(e)) for s, e in offsets[start : start + len(ids)]]


def sampling_params_json(params: SamplingParams) -> dict[str, Any]:
    """The parameters as given (what the engine derives from them, such as the stop strings'
    list, is left out)."""
    return {f.name: _plain(getattr(params, f.name)) for f in dataclasses.fields(params) if f.init}


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, frozenset):  # kept_special_tokens
        return sorted(value)
    return value


def _refuse_beam_search(req: SamplingFields) -> None:
    if req.use_beam_search:
        raise bad_request(
            "Beam search is not supported by the render endpoint", param="use_beam_search"
        )


def add_render_routes(
    app: FastAPI, chat: ServingChat, completion: ServingCompletion, enabled: bool
) -> None:
    if not enabled:
        _add_disabled_routes(app)
        return
    messages = ServingMessages(chat)

    def client_id(prefix: str, raw: Request, given: str | None) -> str:
        return new_id(prefix, given=raw.headers.get("x-request-id") or given)

    async def render_chat(req: ChatCompletionRequest, raw: Request) -> dict[str, Any]:
        _refuse_beam_search(req)
        prompt_ids, params = await chat.prepare(req)
        text, special = req.rendered_prompt, req.add_special_tokens
        offsets = token_offsets(chat.s.tokenizer, text, prompt_ids, req, special)
        rid = client_id("chatcmpl", raw, req.request_id)
        return generate_request(rid, prompt_ids, params, req, offsets)

    @app.post("/v1/chat/completions/render")
    async def render_chat_completion(req: ChatCompletionRequest, raw: Request) -> JSONResponse:
        return JSONResponse(await render_chat(req, raw))

    @app.post("/v1/completions/render")
    async def render_completion(req: CompletionRequest, raw: Request) -> JSONResponse:
        _refuse_beam_search(req)
        req, prompts, _, params = await completion.prepare(req)
        base = client_id("cmpl", raw, req.request_id)
        ids = [base] if len(prompts) == 1 else [f"{base}-{i}" for i in range(len(prompts))]
        texts = [p if isinstance(p, str) else None for p in req.prompts()]
        tokenizer, special = completion.s.tokenizer, req.add_special_tokens
        offsets = [
            token_offsets(tokenizer, text, kept, req, special)
            for text, kept in zip(texts, prompts, strict=True)
        ]
        runs = zip(ids, prompts, params, strict=True)
        return JSONResponse(
            [generate_request(*run, req, at) for run, at in zip(runs, offsets, strict=True)]
        )

    @app.post("/v1/messages/render")
    async def render_messages(req: MessagesRequest, raw: Request) -> JSONResponse:
        return JSONResponse(await render_chat(messages.chat_request(req), raw))


def _add_disabled_routes(app: FastAPI) -> None:
    async def disabled() -> JSONResponse:
        return APIError(
            403,
            "Scale-out endpoints are disabled. Restart pagedserve serve with --enable-scale-out "
            "to enable them.",
            type="PermissionDeniedError",
        ).response()

    for path in RENDER_PATHS:
        app.add_api_route(path, disabled, methods=["POST"], include_in_schema=False)
