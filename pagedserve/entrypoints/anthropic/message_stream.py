"""One message streamed as Anthropic's server-sent events, each an ``event:`` line and a
``data:`` line.

``message_start`` goes out with the engine's first output (which tells how much of the prompt
the prefix cache held), then a ``ping``; then each content block as it is written:
``content_block_start``, its deltas (``thinking_delta``, ``text_delta`` or
``input_json_delta``; a thinking block's ``signature_delta`` last) and ``content_block_stop``;
at the end ``message_delta`` (the stop reason and the whole usage) and ``message_stop``. One
block is open at a time: text after thinking, or a new call, closes the open one. Calls come as
the chat stream gives them (``ToolCallDeltas``): a forced call (``tool`` or ``any``) opens once
its name is known and its input follows as it is written, each call of an ``auto`` answer comes
once the parser sees it whole. An engine failure ends the stream with an ``error`` event.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pagedserve.engine.async_engine import EngineError, RequestStream
from pagedserve.entrypoints.anthropic.answer import Answer, text_block, tool_use_block
from pagedserve.entrypoints.openai.tool_calls import ToolCallDeltas
from pagedserve.outputs import RequestOutput

_GRAMMAR_LIMIT = (
    "the output constraint could not be followed to the end: its grammar hit one of the grammar "
    "engine's limits (the server log names it); simplify the schema, regex or grammar"
)


def event(kind: str, **fields: Any) -> bytes:
    data = json.dumps({"type": kind, **fields}, ensure_ascii=False, separators=(",", ":"))
    return f"event: {kind}\ndata: {data}\n\n".encode()


def error_event(error_type: str, message: str) -> bytes:
    return event("error", error={"type": error_type, "message": message})


class _Blocks:
    """The events of a message's content blocks, numbered in order, one open at a time."""

    def __init__(self, show_thinking: bool) -> None:
        self.show_thinking = show_thinking
        self.index = -1
        self.open: str | None = None  # the open block's type
        self.tool_used = False

    def start(self, block: dict[str, Any]) -> list[bytes]:
        events = self.stop()
        self.index += 1
        self.open = block["type"]
        return [*events, event("content_block_start", index=self.index, content_block=block)]

    def stop(self) -> list[bytes]:
        if self.open is None:
            return []
        events = []
        if self.open == "thinking":
            events.append(self.delta(type="signature_delta", signature=uuid.uuid4().hex))
        events.append(event("content_block_stop", index=self.index))
        self.open = None
        return events

    def delta(self, **delta: Any) -> bytes:
        return event("content_block_delta", index=self.index, delta=delta)

    def thinking(self, text: str) -> list[bytes]:
        events = [] if self.open == "thinking" else self.start(_thinking_start())
        if self.show_thinking:
            events.append(self.delta(type="thinking_delta", thinking=text))
        return events

    def text(self, text: str) -> list[bytes]:
        events = [] if self.open == "text" else self.start(text_block(""))
        return [*events, self.delta(type="text_delta", text=text)]

    def call(self, call: dict[str, Any]) -> list[bytes]:
        """One tool-call delta of the chat stream: a call's start carries its id and name, and
        its arguments follow (whole, or in pieces)."""
        function = call["function"]
        events = []
        if "id" in call:
            events = self.start(tool_use_block(call["id"], function["name"], {}))
            self.tool_used = True
        if function.get("arguments"):
            events.append(self.delta(type="input_json_delta", partial_json=function["arguments"]))
        return events

    def finish(self) -> list[bytes]:
        """Close the last block; an answer with none has one empty text block, as whole."""
        return self.stop() if self.index >= 0 else [*self.start(text_block("")), *self.stop()]


def _thinking_start() -> dict[str, Any]:
    return {"type": "thinking", "thinking": "", "signature": ""}


async def events(answer: Answer, stream: RequestStream) -> AsyncIterator[bytes]:
    """The events of ``answer``, written from the engine's ``stream``."""
    chat, chat_req = answer.chat, answer.chat_req
    blocks = _Blocks(answer.show_thinking)
    mode = chat_req.tool_mode
    parallel = chat_req.parallel_tool_calls is not False
    calls = ToolCallDeltas(mode, answer.call_id, chat_req.tools, parallel) if mode else None
    reasoning_sent = text_sent = 0
    final: RequestOutput | None = None
    try:
        async for out in stream:
            c = out.outputs[0]
            if final is None:
                prompt_thinks = chat.prompt_thinks(out.prompt_token_ids)
                yield _message_start(answer, out)
                yield event("ping")
            final = out
            if c.finish_reason == "error":
                yield error_event("invalid_request_error", _GRAMMAR_LIMIT)
                return
            finished = c.finish_reason is not None
            reasoning, text = chat.split(chat_req, c.text, finished, prompt_thinks)
            new_reasoning = (reasoning or "")[reasoning_sent:]
            reasoning_sent += len(new_reasoning)
            new_text, text_sent = text[text_sent:], len(text)
            delta: dict[str, Any] = {"content": new_text}
            if calls is not None:
                delta, _ = calls.next(new_text, text, c.finish_reason)
            written = blocks.thinking(new_reasoning) if new_reasoning else []
            if delta.get("content"):
                written += blocks.text(delta["content"])
            for call in delta.get("tool_calls") or []:
                written += blocks.call(call)
            for e in written:
                yield e
    except EngineError as exc:
        yield error_event("api_error", str(exc))
        return
    if final is None:  # aborted before the first token: the client has gone
        return
    for e in blocks.finish():
        yield e
    stop_reason, stop_sequence = answer.stop_reason(final.outputs[0], blocks.tool_used)
    stop = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
    yield event("message_delta", delta=stop, usage=answer.usage(final))
    yield event("message_stop")


def _message_start(answer: Answer, first: RequestOutput) -> bytes:
    message = {
        **answer.head(),
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": answer.usage(first),
    }
    return event("message_start", message=message)
