"""POST /v1/responses: OpenAI's Responses API over the chat path, text in and text out.

The request is translated into a chat request (``responses_protocol``) and served by the chat
path's checks, template and engine; the answer is written as a ``response`` object, or streamed
as OpenAI's typed events, from ``response.created`` to ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it). Responses are not stored.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.engine.async_engine import EngineError, RequestStream
from pagedserve.entrypoints.openai.errors import APIError
from pagedserve.entrypoints.openai.responses_protocol import ResponsesRequest
from pagedserve.entrypoints.openai.serving_base import (
    SSEResponse,
    cancel_on_disconnect,
    last_output,
    new_id,
)
from pagedserve.entrypoints.openai.serving_chat import ServingChat
from pagedserve.outputs import RequestOutput

# The chat fields a 400 may name, and the Responses fields the client sent them as.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}


class ServingResponses:
    def __init__(self, chat: ServingChat) -> None:
        self.chat = chat

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        s = self.chat.s
        try:
            prompt_ids, params = await self.chat.prepare(req.chat_request())
        except APIError as exc:
            if exc.param in _PARAMS:
                name = _PARAMS[exc.param]
                if exc.message.startswith(exc.param + " "):
                    exc.message = name + exc.message[len(exc.param) :]
                exc.param = name
            raise
        job = _Job(req, s.model_name, new_id("resp", "_"), new_id("msg", "_"))
        if req.stream:
            stream = (await s.submit_all(job.id, [prompt_ids], [params], None))[0]
            return SSEResponse(job.events(stream), stream.abort)

        async def run() -> Response:
            stream = (await s.submit_all(job.id, [prompt_ids], [params], None))[0]
            return JSONResponse(job.response(await last_output(stream)))

        return await cancel_on_disconnect(raw, run)


class _Job:
    """One response being written."""

    def __init__(self, req: ResponsesRequest, model: str, response_id: str, item_id: str) -> None:
        self.req = req
        self.model = model
        self.id = response_id
        self.item_id = item_id
        self.created = int(time.time())

    def response(self, out: RequestOutput | None) -> dict[str, Any]:
        """The ``response`` object: in progress (no output yet), or finished with ``out``'s."""
        req = self.req
        status, output, usage, incomplete = "in_progress", [], None, None
        if out is not None:
            (c,) = out.outputs
            status = "incomplete" if c.finish_reason == "length" else "completed"
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            output = [self.message(c.text, "completed")]
            usage = {
                "input_tokens": len(out.prompt_token_ids),
                "input_tokens_details": {"cached_tokens": out.num_cached_tokens or 0},
                "output_tokens": len(c.token_ids),
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": len(out.prompt_token_ids) + len(c.token_ids),
            }
        return {
            "id": self.id,
            "object": "response",
            "created_at": self.created,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": req.instructions,
            "max_output_tokens": req.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": None,
            "store": False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": [],
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "user": req.user,
            "usage": usage,
        }

    def message(self, text: str, status: str) -> dict[str, Any]:
        """The output message item holding ``text``."""
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": [_text_part(text)],
        }

    async def events(self, stream: RequestStream) -> AsyncIterator[bytes]:
        """OpenAI's stream of typed events for one text message."""
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            data = {"type": kind, "sequence_number": next(numbers), **fields}
            body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            return f"event: {kind}\ndata: {body}\n\n".encode()

        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        yield event("response.created", response=self.response(None))
        yield event("response.in_progress", response=self.response(None))
        item = {**self.message("", "in_progress"), "content": []}
        yield event("response.output_item.added", output_index=0, item=item)
        yield event("response.content_part.added", **at, part=_text_part(""))
        sent = 0
        final: RequestOutput | None = None
        try:
            async for out in stream:
                final = out
                text = out.outputs[0].text
                if len(text) > sent:
                    yield event("response.output_text.delta", **at, delta=text[sent:], logprobs=[])
                    sent = len(text)
        except EngineError as exc:
            yield event("error", code="server_error", message=str(exc), param=None)
            return
        assert final is not None
        text = final.outputs[0].text
        yield event("response.output_text.done", **at, text=text, logprobs=[])
        yield event("response.content_part.done", **at, part=_text_part(text))
        yield event(
            "response.output_item.done", output_index=0, item=self.message(text, "completed")
        )
        done = self.response(final)
        yield event(f"response.{done['status']}", response=done)


def _text_part(text: str) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": []}
