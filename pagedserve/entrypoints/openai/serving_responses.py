"""POST /v1/responses: OpenAI's Responses API over the chat path.

The request is translated into a chat request (``responses_protocol``) and served by the chat
path's checks, template, tool calls and engine; the answer is written as a ``response`` object,
or streamed as OpenAI's typed events, from ``response.created`` to ``response.completed`` (or
``response.incomplete`` when ``max_output_tokens`` cut it). A text answer streams as it comes;
with tools the answer is read back into a message and ``function_call`` items once it is whole
(as chat's ``required`` calls are), and their events go out then. Finished responses are
stored (unless ``store`` is false) for ``previous_response_id``, ``GET`` and ``DELETE``; see
``response_store``. A ``background`` response is written by a task in the server while the
client polls, streams or cancels it; see ``background_responses``.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.engine.async_engine import EngineError, RequestStream
from pagedserve.entrypoints.openai.background_responses import (
    RUNNING,
    BackgroundResponses,
    not_found,
)
from pagedserve.entrypoints.openai.errors import APIError, bad_request
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.response_store import ResponseStore
from pagedserve.entrypoints.openai.responses_protocol import ResponsesRequest
from pagedserve.entrypoints.openai.serving_base import header_priority, new_id
from pagedserve.entrypoints.openai.serving_chat import ServingChat
from pagedserve.entrypoints.openai.streams import (
    CONSTRAINTS_FAILED,
    SSEResponse,
    cancel_on_disconnect,
    last_output,
)
from pagedserve.entrypoints.openai.tool_calls import final_answer
from pagedserve.outputs import CompletionOutput, RequestOutput

# The chat fields a 400 may name, and the Responses fields the client sent them as.
_PARAMS = {"max_tokens": "max_output_tokens", "messages": "input", "response_format": "text"}
# A response's status by its answer's finish reason (others: completed); the server's own abort
# (a /pause, a shutdown) cancels it, as vLLM has it.
FINISH_STATUS = {"length": "incomplete", "abort": "cancelled"}


class ServingResponses:
    def __init__(self, chat: ServingChat) -> None:
        self.chat = chat
        self.store = ResponseStore()
        self.background = BackgroundResponses(self.store)

    async def create(self, req: ResponsesRequest, raw: Request) -> Response:
        s = self.chat.s
        history: list[dict[str, Any]] = []
        if req.previous_response_id is not None:
            stored = self.store.conversation(req.previous_response_id)
            if stored is None:
                raise bad_request(
                    f"Previous response with id '{req.previous_response_id}' not found.",
                    param="previous_response_id",
                    code="previous_response_not_found",
                )
            if self.store.get(req.previous_response_id)["status"] in RUNNING:
                raise bad_request(
                    f"Previous response with id '{req.previous_response_id}' is still running.",
                    param="previous_response_id",
                )
            history = stored
        chat_req = req.chat_request(history)
        chat_req.priority = header_priority(raw.headers, chat_req.priority)
        s.check_priority(chat_req.priority)  # a 400 now, not a failed background response
        try:
            prompt_ids, params = await self.chat.prepare(chat_req)
        except APIError as exc:
            if exc.param in _PARAMS:
                name = _PARAMS[exc.param]
                if exc.message.startswith(exc.param + " "):
                    exc.message = name + exc.message[len(exc.param) :]
                exc.param = name
            raise
        conversation = history + req.input_messages()
        job = _Job(req, self.chat, chat_req, self._keeper(req, conversation))

        async def submit() -> RequestStream:
            return (await s.submit_all(job.id, [prompt_ids], [params], chat_req))[0]

        if req.background:
            queued, log = self.background.start(job, conversation, submit, bool(req.stream))
            if log is None:
                return JSONResponse(queued)
            return SSEResponse(log.read(), lambda: None)  # leaving it leaves the response running
        if req.stream:
            stream = await submit()
            return SSEResponse(job.events(stream), stream.abort)

        async def run() -> Response:
            stream = await submit()
            body = job.response(await last_output(stream))
            job.keep(body)
            return JSONResponse(body)

        return await cancel_on_disconnect(raw, run)

    def _keeper(
        self, req: ResponsesRequest, conversation: list[dict[str, Any]]
    ) -> Callable[[dict[str, Any]], None]:
        """What a finished response is handed to: the store, unless ``store`` is false."""
        if req.store is False:
            return lambda _: None
        return lambda response: self.store.save(response, conversation)

    def retrieve(
        self, response_id: str, stream: bool = False, starting_after: int | None = None
    ) -> Response:
        """``GET /v1/responses/{id}``: a stored response, or with ``stream`` the events of a
        streamed background one (after ``starting_after``)."""
        if stream:
            return SSEResponse(self.background.events(response_id, starting_after), lambda: None)
        response = self.store.get(response_id)
        if response is None:
            raise not_found(response_id)
        return JSONResponse(response)

    async def cancel(self, response_id: str) -> dict[str, Any]:
        """``POST /v1/responses/{id}/cancel``."""
        return await self.background.cancel(response_id)

    async def delete(self, response_id: str) -> dict[str, Any]:
        """``DELETE /v1/responses/{id}``; a background response still running is stopped."""
        if self.store.get(response_id) is None:
            raise not_found(response_id)
        await self.background.forget(response_id)
        self.store.delete(response_id)
        return {"id": response_id, "object": "response.deleted", "deleted": True}


class _Job:
    """One response being written."""

    def __init__(
        self,
        req: ResponsesRequest,
        chat: ServingChat,
        chat_req: ChatCompletionRequest,
        keep: Callable[[dict[str, Any]], None],
    ) -> None:
        self.req = req
        self.keep = keep  # takes the finished response (to store it)
        self.chat = chat
        self.chat_req = chat_req
        self.model = chat.s.reported_model(req.model)
        self.tool_mode = chat_req.tool_mode
        self.id = new_id("resp", "_")
        self.item_id = new_id("msg", "_")
        self.created = int(time.time())
        self.error: str | None = None  # set as the stream ends in an error event

    def output(self, out: RequestOutput) -> list[dict[str, Any]]:
        """The output items of a finished answer: a reasoning model's thinking as a reasoning
        item (with the server's reasoning parser), then its text as a message, or with tools
        the message (if any text) and one ``function_call`` item per call. In an answer cut by
        ``max_output_tokens`` the last item, the one cut, is ``incomplete``, as OpenAI's."""
        (c,) = out.outputs
        items = self._items(c, self.chat.prompt_thinks(out.prompt_token_ids))
        if items and c.finish_reason == "length":
            items[-1] = {**items[-1], "status": "incomplete"}
        return items

    def _items(self, c: CompletionOutput, prompt_thinks: bool) -> list[dict[str, Any]]:
        reasoning, text = self.chat.split(self.chat_req, c.text, True, prompt_thinks)
        items = [_reasoning_item(reasoning)] if reasoning else []
        if self.tool_mode is None:
            logprobs = self.logprobs(c, 0, len(c.token_ids))
            return [*items, self.message(text, "completed", logprobs)]
        call_id = self.chat.s.parser_call_id or (lambda: new_id("call", "_"))
        parallel = self.chat_req.parallel_tool_calls is not False
        fields, _ = final_answer(
            text, self.tool_mode, c.finish_reason, call_id, self.chat_req.tools, parallel
        )
        if fields.get("content"):
            items.append(self.message(fields["content"], "completed"))
        for call in fields.get("tool_calls") or []:
            function = call["function"]
            items.append(
                {
                    "type": "function_call",
                    "id": new_id("fc", "_"),
                    "call_id": call["id"],
                    "name": function["name"],
                    "arguments": function["arguments"],
                    "status": "completed",
                }
            )
        return items

    def response(
        self,
        out: RequestOutput | None,
        output: list[dict[str, Any]] | None = None,
        pending: str = "in_progress",
    ) -> dict[str, Any]:
        """The ``response`` object: ``pending`` (no output yet), or finished with ``out``'s
        (whose output items ``output`` already holds, if they were written before)."""
        req = self.req
        status, usage, incomplete = pending, None, None
        if out is not None:
            (c,) = out.outputs
            status = FINISH_STATUS.get(c.finish_reason or "", "completed")
            if status == "incomplete":
                incomplete = {"reason": "max_output_tokens"}
            if output is None:
                output = self.output(out)
            prompt_thinks = self.chat.prompt_thinks(out.prompt_token_ids)
            reasoning_tokens = self.chat.reasoning_tokens(self.chat_req, c, prompt_thinks) or 0
            usage = {
                "input_tokens": len(out.prompt_token_ids),
                "input_tokens_details": {"cached_tokens": out.num_cached_tokens or 0},
                "output_tokens": len(c.token_ids),
                "output_tokens_details": {"reasoning_tokens": reasoning_tokens},
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
            "output": output or [],
            "parallel_tool_calls": req.parallel_tool_calls is not False,
            "previous_response_id": req.previous_response_id,
            "background": req.background is True,
            "store": req.store is not False,
            "temperature": 1.0 if req.temperature is None else req.temperature,
            "top_p": 1.0 if req.top_p is None else req.top_p,
            "text": {"format": (req.text or {}).get("format") or {"type": "text"}},
            "tool_choice": req.tool_choice or "auto",
            "tools": req.tools or [],
            "truncation": "disabled",
            "metadata": req.metadata or {},
            "user": req.user,
            "usage": usage,
        }

    def logprobs(self, c: CompletionOutput, start: int, end: int) -> list[dict[str, Any]]:
        """The logprobs of tokens ``start:end`` of a text answer, when the request includes them
        (none otherwise)."""
        top = self.chat_req.num_logprobs
        if top is None or self.tool_mode is not None:
            return []
        return self.chat.logprob_entries(self.chat_req, c, start, end, top) or []

    def message(
        self, text: str, status: str, logprobs: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """The output message item holding ``text`` (and its tokens' ``logprobs``)."""
        return {
            "type": "message",
            "id": self.item_id,
            "status": status,
            "role": "assistant",
            "content": [_text_part(text, logprobs)],
        }

    async def events(self, stream: AsyncIterator[RequestOutput]) -> AsyncIterator[bytes]:
        """OpenAI's stream of typed events (a background response's is created queued)."""
        numbers = itertools.count()

        def event(kind: str, **fields: Any) -> bytes:
            data = {"type": kind, "sequence_number": next(numbers), **fields}
            body = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
            return f"event: {kind}\ndata: {body}\n\n".encode()

        pending = "queued" if self.req.background else "in_progress"
        yield event("response.created", response=self.response(None, pending=pending))
        yield event("response.in_progress", response=self.response(None))
        # A plain text answer streams; tool calls and a reasoning model's items go out whole.
        streaming = self.tool_mode is None and self.chat.s.reasoning is None
        at = {"item_id": self.item_id, "output_index": 0, "content_index": 0}
        if streaming:
            item = {**self.message("", "in_progress"), "content": []}
            yield event("response.output_item.added", output_index=0, item=item)
            yield event("response.content_part.added", **at, part=_text_part(""))
        sent = tokens_sent = 0
        final: RequestOutput | None = None
        try:
            async for out in stream:
                final = out
                c = out.outputs[0]
                if c.finish_reason == "error":  # a whole answer's 400, once the stream is open
                    self.error = CONSTRAINTS_FAILED
                    code = "invalid_request_error"
                    yield event("error", code=code, message=CONSTRAINTS_FAILED, param=None)
                    return
                if streaming and len(c.text) > sent:
                    num_tokens = len(c.token_ids)
                    logprobs = self.logprobs(c, tokens_sent, num_tokens)
                    delta = c.text[sent:]
                    yield event("response.output_text.delta", **at, delta=delta, logprobs=logprobs)
                    sent, tokens_sent = len(c.text), num_tokens
        except EngineError as exc:
            yield event("error", code="server_error", message=str(exc), param=None)
            return
        assert final is not None
        output = self.output(final)
        for index, item in enumerate(output):
            if not streaming:
                added = {**item, "status": "in_progress"}
                if item["type"] == "function_call":
                    added["arguments"] = ""
                else:
                    added["content"] = []
                yield event("response.output_item.added", output_index=index, item=added)
            for kind, fields in _item_events(item, index, opened=streaming):
                yield event(kind, **fields)
            yield event("response.output_item.done", output_index=index, item=item)
        done = self.response(final, output)
        self.keep(done)
        # OpenAI's stream has no cancelled event: vLLM ends a cancelled one as completed.
        ending = "completed" if done["status"] == "cancelled" else done["status"]
        yield event(f"response.{ending}", response=done)


def _item_events(
    item: dict[str, Any], index: int, opened: bool
) -> list[tuple[str, dict[str, Any]]]:
    """The events that write a finished item's body, after its ``output_item.added``: a
    message's text part (``opened``: its part was added and its text streamed already), a
    call's arguments, a reasoning item's text."""
    if item["type"] == "function_call":
        at = {"item_id": item["id"], "output_index": index}
        return [
            ("response.function_call_arguments.delta", {**at, "delta": item["arguments"]}),
            ("response.function_call_arguments.done", {**at, "arguments": item["arguments"]}),
        ]
    (part,) = item["content"]
    at = {"item_id": item["id"], "output_index": index, "content_index": 0}
    if item["type"] == "reasoning":
        return [
            ("response.reasoning_text.delta", {**at, "delta": part["text"]}),
            ("response.reasoning_text.done", {**at, "text": part["text"]}),
        ]
    events = []
    if not opened:
        events.append(("response.content_part.added", {**at, "part": _text_part("")}))
        delta = {**at, "delta": part["text"], "logprobs": part["logprobs"]}
        events.append(("response.output_text.delta", delta))
    done = {**at, "text": part["text"], "logprobs": part["logprobs"]}
    events.append(("response.output_text.done", done))
    events.append(("response.content_part.done", {**at, "part": part}))
    return events


def _reasoning_item(text: str) -> dict[str, Any]:
    return {
        "type": "reasoning",
        "id": new_id("rs", "_"),
        "summary": [],
        "content": [{"type": "reasoning_text", "text": text}],
        "status": "completed",
    }


def _text_part(text: str, logprobs: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": logprobs or []}
