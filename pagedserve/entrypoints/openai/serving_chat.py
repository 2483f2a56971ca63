"""POST /v1/chat/completions: OpenAI's chat completion objects and chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.engine.async_engine import EngineError, RequestStream
from pagedserve.entrypoints.openai.chat_message import message_text
from pagedserve.entrypoints.openai.chat_prompt_logprobs import chat_prompt_logprobs
from pagedserve.entrypoints.openai.errors import error_body
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.serving_base import (
    OpenAIServing,
    by_rank,
    clamp_logprob,
    header_priority,
    new_id,
    prompt_logprobs_json,
    usage_dict,
    usage_so_far,
)
from pagedserve.entrypoints.openai.stream_interval import StreamGate
from pagedserve.entrypoints.openai.streams import (
    SSE_DONE,
    SSEResponse,
    cancel_on_disconnect,
    sse,
)
from pagedserve.entrypoints.openai.tool_calls import AUTO, ToolCallDeltas, final_answer
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedserve.entrypoints.openai.whole_vocabulary import resolve_whole_vocabulary
from pagedserve.outputs import CompletionOutput, RequestOutput
from pagedserve.reasoning_parsers import ReasoningParser
from pagedserve.sample.thinking_budget import count_reasoning_tokens
from pagedserve.sampling_params import SamplingParams


class ServingChat:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    async def prepare(self, req: ChatCompletionRequest) -> tuple[list[int], SamplingParams]:
        """The request checked, its messages rendered by the chat template and tokenized, and
        its sampling parameters; a 400 for what is wrong."""
        s = self.s
        s.check_model(req.model)
        req.resolve_tools(s.tool_parser)
        req.refuse_unsupported()
        resolve_whole_vocabulary(req, s.vocab_size, s.max_logprobs)
        text = s.render_chat(req, req.tools)
        req.keep_prompt_text(text)
        prompt_ids = req.truncated(await s.tokenize(text, req.add_special_tokens), s.max_model_len)
        params = s.sampling_params(
            req,
            req.requested_max_tokens,
            len(prompt_ids),
            req.num_logprobs,
            chat_prompt_logprobs(req),
            prompt_param="messages",
            logprobs_param="top_logprobs",
        )
        params.kept_special_tokens = self.parsers_special_tokens(req)
        return prompt_ids, params

    def parsers_special_tokens(self, req: ChatCompletionRequest) -> frozenset[str]:
        """The special tokens that mark what the server's parsers read in ``req``'s answer
        (Magistral's thinking, Mistral's calls): its text keeps them, and with
        ``skip_special_tokens`` (the default) drops the others (a ``</s>`` or ``[INST]`` the
        model writes), as vLLM's parsers do; with it false, every special token stays."""
        kept = self.s.reasoning.special_tokens if self.s.reasoning is not None else frozenset()
        mode = req.tool_mode
        if mode is not None and mode[0] == AUTO:
            kept |= TOOL_PARSERS[mode[1]].special_tokens
        return kept

    async def create(self, req: ChatCompletionRequest, raw: Request) -> Response:
        s = self.s
        prompt_ids, params = await self.prepare(req)
        req.priority = header_priority(raw.headers, req.priority)
        top_logprobs = req.num_logprobs
        request_id = new_id("chatcmpl", given=raw.headers.get("x-request-id") or req.request_id)
        engine_id = new_id("chatcmpl")  # unique in the engine, whatever request_id a client repeats
        created = int(time.time())
        if req.stream:
            stream = (await s.submit_all(engine_id, [prompt_ids], [params], req, request_id))[0]
            return SSEResponse(
                self._stream(req, request_id, created, stream, top_logprobs, prompt_ids),
                stream.abort,
            )

        async def run() -> Response:
            (final,) = await s.final_outputs(engine_id, [prompt_ids], [params], req, request_id)
            return JSONResponse(self._response(req, request_id, created, final, top_logprobs))

        return await cancel_on_disconnect(raw, run)

    def _response(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        created: int,
        out: RequestOutput,
        top_logprobs: int | None,
    ) -> dict[str, Any]:
        tool_mode = req.tool_mode
        parallel = req.parallel_tool_calls is not False
        hidden = self.hides_reasoning(req)
        echoed = self.echoed(req)
        choices = []
        prompt_thinks = self.prompt_thinks(out.prompt_token_ids)
        for c in sorted(out.outputs, key=lambda c: c.index):
            logprobs = None
            if top_logprobs is not None and not hidden:
                entries = self.logprob_entries(req, c, 0, len(c.token_ids), top_logprobs)
                logprobs = {"content": entries}
            reasoning, text = self.split(req, c.text, True, prompt_thinks)
            message: dict[str, Any] = {"role": self.role(req), "content": text, "refusal": None}
            if reasoning is not None:
                shown = None if hidden else (reasoning or None)
                message.update(content=text or None, **_reasoning(shown))
            finish_reason = c.finish_reason
            if tool_mode is not None:
                fields, finish_reason = final_answer(
                    text, tool_mode, finish_reason, self.call_id, req.tools, parallel
                )
                message.update(fields)
            if echoed:
                message["content"] = echoed + (message["content"] or "")
            choice = {
                "index": c.index,
                "message": message,
                "logprobs": logprobs,
                "finish_reason": finish_reason,
                "stop_reason": c.stop_reason,
            }
            if req.return_token_ids:
                choice["token_ids"] = c.token_ids
            choices.append(choice)
        body = {
            "id": request_id,
            "object": "chat.completion",
            "created": created,
            "model": self.s.reported_model(req.model),
            "choices": choices,
            "usage": self.usage(req, out),
            "system_fingerprint": None,
            "prompt_logprobs": prompt_logprobs_json(out, chat_prompt_logprobs(req)),
        }
        if req.return_token_ids:
            body["prompt_token_ids"] = out.prompt_token_ids
        return {**body, **req.prompt_text_field()}

    async def _stream(
        self,
        req: ChatCompletionRequest,
        request_id: str,
        created: int,
        stream: RequestStream,
        top_logprobs: int | None,
        prompt_ids: list[int],
    ) -> AsyncIterator[bytes]:
        n = req.n
        include_usage, continuous = req.stream_usage(self.s.defaults.force_include_usage)
        head = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": self.s.reported_model(req.model),
        }

        def chunk(choice: dict[str, Any], completed: int = 0, **fields: Any) -> bytes:
            obj = {**head, "choices": [choice], **fields}
            if include_usage:  # continuous: the choice's usage so far
                obj["usage"] = usage_so_far(len(prompt_ids), completed) if continuous else None
            return sse(obj)

        for i in range(n):
            first = {"prompt_token_ids": prompt_ids} if req.return_token_ids and i == 0 else {}
            first.update(req.prompt_text_field() if i == 0 else {})
            yield chunk(
                {
                    "index": i,
                    "delta": {"role": self.role(req), "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                    "stop_reason": None,
                },
                **first,
            )
        echoed = self.echoed(req)
        if echoed:  # vLLM sends it as each choice's first content
            for i in range(n):
                yield chunk({"index": i, "delta": {"content": echoed}, "logprobs": None,
                             "finish_reason": None, "stop_reason": None})  # fmt: skip
        tool_mode = req.tool_mode
        hidden = self.hides_reasoning(req)
        if hidden:
            top_logprobs = None
        parallel = req.parallel_tool_calls is not False
        tool_deltas = (
            [ToolCallDeltas(tool_mode, self.call_id, req.tools, parallel) for _ in range(n)]
            if tool_mode
            else None
        )
        text_pos = [0] * n
        reasoning_pos = [0] * n
        token_pos = [0] * n
        ids_sent = [0] * n  # token ids sent, for return_token_ids
        done = [False] * n
        final: RequestOutput | None = None
        gate = StreamGate(req.stream_interval)
        try:
            async for out in stream:
                if final is None:
                    prompt_thinks = self.prompt_thinks(out.prompt_token_ids)
                final = out
                if not gate.passes(out):
                    continue
                for c in out.outputs:
                    i = c.index
                    if done[i]:
                        continue
                    finished = c.finish_reason is not None
                    reasoning, text = self.split(req, c.text, finished, prompt_thinks)
                    new_reasoning = (reasoning or "")[reasoning_pos[i] :]
                    new_text = text[text_pos[i] :]
                    num_tokens = len(c.token_ids)
                    new_logprobs = top_logprobs is not None and num_tokens > token_pos[i]
                    if not (new_text or new_reasoning or new_logprobs or c.finish_reason):
                        continue
                    logprobs = None
                    if top_logprobs is not None:
                        entries = self.logprob_entries(
                            req, c, token_pos[i], num_tokens, top_logprobs
                        )
                        logprobs = {"content": entries}
                    text_pos[i] = len(text)
                    reasoning_pos[i] += len(new_reasoning)
                    token_pos[i] = num_tokens
                    done[i] = c.finish_reason is not None
                    delta: dict[str, Any] = {"content": new_text} if new_text else {}
                    finish_reason = c.finish_reason
                    if tool_deltas is not None:
                        delta, finish_reason = tool_deltas[i].next(new_text, text, finish_reason)
                    if new_reasoning and not hidden:
                        delta = {**_reasoning(new_reasoning), **delta}
                    if not delta and finish_reason is None and logprobs is None:
                        continue
                    choice = {
                        "index": i,
                        "delta": delta,
                        "logprobs": logprobs,
                        "finish_reason": finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                    if req.return_token_ids:
                        choice["token_ids"] = c.token_ids[ids_sent[i] : num_tokens]
                        ids_sent[i] = num_tokens
                    yield chunk(choice, num_tokens)
        except EngineError as exc:
            yield sse(error_body(str(exc), "server_error", None, 500))
            yield SSE_DONE
            return
        if include_usage and final is not None:
            yield sse({**head, "choices": [], "usage": self.usage(req, final)})
        yield SSE_DONE

    def role(self, req: ChatCompletionRequest) -> str:
        """The answer's role: ``--response-role`` after a generation prompt, else the role of
        the message it continues (as vLLM)."""
        if req.add_generation_prompt:
            return self.s.defaults.response_role
        return req.messages[-1].role

    def echoed(self, req: ChatCompletionRequest) -> str:
        """vLLM's ``echo``: the last message's text, which the answer repeats before its own
        when that message has the answer's role (one it continues)."""
        last = req.messages[-1]
        if not req.echo or last.role != self.role(req):
            return ""
        return message_text(last, len(req.messages) - 1) or ""

    def call_id(self) -> str:
        """A tool call's id: the server's parser's format (Mistral), else OpenAI-like."""
        if self.s.parser_call_id is not None:
            return self.s.parser_call_id()
        return new_id("chatcmpl-tool")

    def split(
        self, req: ChatCompletionRequest, text: str, final: bool, prompt_thinks: bool
    ) -> tuple[str | None, str]:
        """(reasoning, content) of an answer so far, with the server's reasoning parser; without
        one, (None, text). ``prompt_thinks``: the answer's prompt ends inside an open
        ``<think>`` (:meth:`prompt_thinks`). A grammar that held the answer from its first token
        let it think only where the answer opens with ``<think>`` (a template that opened it saw
        no thinking from a JSON schema, and a ``</think>`` in a JSON string is no end of
        thinking)."""
        parser = self.parser(req)
        if parser is None:
            return None, text
        return parser.split(text, final, prompt_thinks)

    def parser(self, req: ChatCompletionRequest) -> ReasoningParser | None:
        """The reasoning parser that splits ``req``'s answers (see :meth:`split`)."""
        if self.s.reasoning is None:
            return None
        return self.s.reasoning.held_by_grammar() if req.constrained else self.s.reasoning

    def reasoning_tokens(
        self, req: ChatCompletionRequest, c: CompletionOutput, prompt_thinks: bool
    ) -> int | None:
        """The tokens of a whole answer that :meth:`split` gave its reasoning (usage's
        ``reasoning_tokens``); None without a reasoning parser."""
        parser, markers = self.parser(req), self.s.thinking
        if parser is None or markers is None:
            return None
        thinking = parser.thinking(c.text, True, prompt_thinks)
        assert thinking is not None  # a whole answer's is decided
        return count_reasoning_tokens(markers, c.token_ids, thinking)

    def usage(self, req: ChatCompletionRequest, out: RequestOutput) -> dict[str, Any]:
        """The answer's usage; with a reasoning parser, as vLLM's, its reasoning tokens too."""
        usage = usage_dict(
            len(out.prompt_token_ids),
            sum(len(c.token_ids) for c in out.outputs),
            out.num_cached_tokens or 0,
        )
        if self.s.reasoning is not None:
            prompt_thinks = self.prompt_thinks(out.prompt_token_ids)
            reasoning = sum(self.reasoning_tokens(req, c, prompt_thinks) or 0 for c in out.outputs)
            usage["completion_tokens_details"] = {"reasoning_tokens": reasoning}
        return usage

    def prompt_thinks(self, prompt_token_ids: list[int]) -> bool:
        """Whether a prompt ends inside an open thinking section (a chat template, as
        Qwen3-2507's, that opened ``<think>`` for the answer)."""
        markers = self.s.thinking
        return markers is not None and markers.open_at_end(prompt_token_ids)

    def hides_reasoning(self, req: ChatCompletionRequest) -> bool:
        """``include_reasoning: false`` on a server with a reasoning parser: the reasoning is
        left out, and so are the logprobs, which would show its tokens (as vLLM)."""
        return not req.include_reasoning and self.s.reasoning is not None

    def logprob_entries(
        self, req: ChatCompletionRequest, c: CompletionOutput, start: int, end: int, top: int
    ) -> list[dict[str, Any]] | None:
        """OpenAI's layout (chat's ``logprobs.content``, the Responses API's text parts): one
        entry per token of ``start:end``, with its ``top`` best alternatives."""
        if c.logprobs is None:
            return None
        label = self.s.token_labeler(req.return_tokens_as_token_ids)
        entries = []
        for token_id, alternatives in zip(
            c.token_ids[start:end], c.logprobs[start:end], strict=False
        ):
            chosen = alternatives.get(token_id)
            text = label(chosen, token_id)
            if req.logprob_token_ids:  # the sampled token and the listed ones, as vLLM
                best = list(alternatives.items())
            else:
                best = sorted(alternatives.items(), key=by_rank)[:top] if top else []
            entries.append(
                {
                    "token": text,
                    "logprob": clamp_logprob(chosen.logprob) if chosen else -9999.0,
                    "bytes": list(text.encode()),
                    "top_logprobs": [
                        {
                            "token": (t := label(lp, tid)),
                            "logprob": clamp_logprob(lp.logprob),
                            "bytes": list(t.encode()),
                        }
                        for tid, lp in best
                    ],
                }
            )
        return entries


def _reasoning(text: str | None) -> dict[str, str | None]:
    """A message's (or delta's) reasoning, under vLLM's newer name and its older one."""
    return {"reasoning": text, "reasoning_content": text}
