"""One Anthropic ``message`` being written from the chat path's output: its content blocks (a
``thinking`` block with the server's reasoning parser, then ``text`` and ``tool_use`` blocks),
its ``stop_reason`` and its ``usage``."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pagedserve.entrypoints.anthropic.protocol import MessagesRequest
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.serving_base import new_id
from pagedserve.entrypoints.openai.serving_chat import ServingChat
from pagedserve.entrypoints.openai.tool_calls import final_answer
from pagedserve.outputs import CompletionOutput, RequestOutput


class Answer:
    """One ``message`` being written: its id, blocks, stop reason and usage."""

    def __init__(
        self, chat: ServingChat, chat_req: ChatCompletionRequest, req: MessagesRequest
    ) -> None:
        self.chat = chat
        self.chat_req = chat_req
        self.max_tokens = req.max_tokens
        self.show_thinking = req.thinking is None or req.thinking.display != "omitted"
        self.id = new_id("msg", "_")
        self.model = chat.s.reported_model(req.model)
        parser_call_id = chat.s.parser_call_id
        self.call_id = parser_call_id or (lambda: new_id("toolu", "_"))

    def message(self, out: RequestOutput) -> dict[str, Any]:
        """The finished ``message`` object."""
        (c,) = out.outputs
        blocks, tool_used = self.blocks(c, self.chat.prompt_thinks(out.prompt_token_ids))
        stop_reason, stop_sequence = self.stop_reason(c, tool_used)
        return {
            **self.head(),
            "content": blocks or [text_block("")],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self.usage(out),
        }

    def head(self) -> dict[str, Any]:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model}

    def blocks(self, c: CompletionOutput, prompt_thinks: bool) -> tuple[list[dict[str, Any]], bool]:
        """(the content blocks of a finished answer, whether it calls a tool; ``prompt_thinks``:
        its prompt ends inside an open ``<think>``). A call whose input is not a JSON object
        (cut by ``max_tokens``) stays text, not a call to run."""
        reasoning, text = self.chat.split(self.chat_req, c.text, True, prompt_thinks)
        blocks = [self.thinking_block(reasoning)] if reasoning else []
        mode = self.chat_req.tool_mode
        if mode is None:
            return blocks + ([text_block(text)] if text else []), False
        parallel = self.chat_req.parallel_tool_calls is not False
        fields, _ = final_answer(
            text, mode, c.finish_reason, self.call_id, self.chat_req.tools, parallel
        )
        if fields.get("content"):
            blocks.append(text_block(fields["content"]))
        tool_used = False
        for call in fields.get("tool_calls") or []:
            function = call["function"]
            arguments = json_object(function["arguments"])
            if arguments is None:
                blocks.append(text_block(function["arguments"]))
                continue
            blocks.append(tool_use_block(call["id"], function["name"], arguments))
            tool_used = True
        return blocks, tool_used

    def thinking_block(self, thinking: str) -> dict[str, Any]:
        """A thinking block; its signature is opaque (nothing checks it when it comes back)."""
        shown = thinking if self.show_thinking else ""
        return {"type": "thinking", "thinking": shown, "signature": uuid.uuid4().hex}

    def stop_reason(self, c: CompletionOutput, tool_used: bool) -> tuple[str, str | None]:
        """(``stop_reason``, ``stop_sequence``). An answer cut before ``max_tokens`` ran out of
        the model's context: ``model_context_window_exceeded``, as Anthropic's API says."""
        if c.finish_reason == "length":
            if len(c.token_ids) < self.max_tokens:
                return "model_context_window_exceeded", None
            return "max_tokens", None
        if tool_used:
            return "tool_use", None
        if c.finish_reason == "stop" and isinstance(c.stop_reason, str):
            return "stop_sequence", c.stop_reason
        return "end_turn", None

    def usage(self, out: RequestOutput) -> dict[str, Any]:
        """Anthropic's usage: ``input_tokens`` are the prompt tokens computed, the prefix
        cache's are ``cache_read_input_tokens`` (their sum is chat's ``prompt_tokens``); with a
        reasoning parser, ``output_tokens_details.thinking_tokens`` are chat's
        ``reasoning_tokens``."""
        cached = out.num_cached_tokens or 0
        (c,) = out.outputs
        usage: dict[str, Any] = {
            "input_tokens": len(out.prompt_token_ids) - cached,
            "output_tokens": len(c.token_ids),
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        }
        prompt_thinks = self.chat.prompt_thinks(out.prompt_token_ids)
        thinking = self.chat.reasoning_tokens(self.chat_req, c, prompt_thinks)
        if thinking is not None:
            usage["output_tokens_details"] = {"thinking_tokens": thinking}
        return usage


def text_block(text: str) -> dict[str, Any]:
    return {"type": "text", "text": text}


def tool_use_block(call_id: str, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
    return {"type": "tool_use", "id": call_id, "name": name, "input": arguments}


def json_object(text: str) -> dict[str, Any] | None:
    """``text`` read as a JSON object, or None."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None
