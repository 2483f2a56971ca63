"""POST /v1/completions: OpenAI's (legacy) text completion objects and chunks."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.engine.async_engine import EngineError, RequestStream
from pagedserve.entrypoints.openai.errors import bad_request, error_body
from pagedserve.entrypoints.openai.protocol import CompletionRequest
from pagedserve.entrypoints.openai.serving_base import (
    OpenAIServing,
    by_rank,
    clamp_logprob,
    header_priority,
    new_id,
    prompt_logprobs_json,
    top_alternatives,
    usage_dict,
    usage_so_far,
)
from pagedserve.entrypoints.openai.stream_interval import StreamGate
from pagedserve.entrypoints.openai.streams import (
    SSE_DONE,
    SSEResponse,
    cancel_on_disconnect,
    merged,
    sse,
)
from pagedserve.entrypoints.openai.whole_vocabulary import resolve_whole_vocabulary
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput, SampleLogprobs
from pagedserve.sampling_params import SamplingParams


class ServingCompletion:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    async def prepare(
        self, req: CompletionRequest
    ) -> tuple[CompletionRequest, list[list[int]], list[str | None], list[SamplingParams]]:
        """The request checked (an echo alone made a one-token run), its prompts tokenized and
        truncated, their texts (None where the model sees other than the text) and sampling
        parameters; a 400 for what is wrong."""
        s = self.s
        s.check_model(req.model)
        req.refuse_unsupported()
        resolve_whole_vocabulary(req, s.vocab_size, s.max_logprobs)
        prompt_ids: list[list[int]] = []
        prompt_texts: list[str | None] = []
        for prompt in req.prompts():
            if isinstance(prompt, str):
                ids = await s.tokenize(prompt, req.add_special_tokens)
                prompt_texts.append(prompt)
            else:
                ids = list(prompt)
                s.check_token_ids(ids, "prompt")
                prompt_texts.append(None)
            if not ids:
                raise bad_request("prompt must not be empty", param="prompt")
            kept = req.truncated(ids, s.max_model_len)
            if len(kept) < len(ids):
                prompt_texts[-1] = None  # an echo shows what the model saw
            prompt_ids.append(kept)
        # The prompt's logprobs, computed once for whichever of echo and prompt_logprobs asks
        # for more alternatives; a negative one (a bad value: -1 was resolved above) stands over
        # the other, so that its check refuses it.
        asked = (req.logprobs if req.echo else None, req.returned_prompt_logprobs)
        given = [n for n in asked if n is not None]
        prompt_logprobs = min(given) if any(n < 0 for n in given) else max(given, default=None)
        max_tokens = req.requested_max_tokens
        if req.echo_only:
            # The engine samples at least one token: one that always ends by length, dropped
            # from the answer (see _Job._generated).
            max_tokens = 1
            req = req.model_copy(
                update={"ignore_eos": True, "stop": None, "stop_token_ids": None, "min_tokens": 0}
            )
        params = [
            s.sampling_params(req, max_tokens, len(ids), req.logprobs, prompt_logprobs)
            for ids in prompt_ids
        ]
        return req, prompt_ids, prompt_texts, params

    async def create(self, req: CompletionRequest, raw: Request) -> Response:
        s = self.s
        req, prompt_ids, prompt_texts, params = await self.prepare(req)
        req.priority = header_priority(raw.headers, req.priority)
        request_id = new_id("cmpl", given=raw.headers.get("x-request-id") or req.request_id)
        engine_id = new_id("cmpl")  # unique in the engine, whatever request_id a client repeats
        created = int(time.time())
        job = _Job(self, req, request_id, created, prompt_ids, prompt_texts)
        if req.stream:
            streams = await s.submit_all(engine_id, prompt_ids, params, req, request_id)
            return SSEResponse(job.stream(streams), lambda: [st.abort() for st in streams])

        async def run() -> Response:
            finals = await s.final_outputs(engine_id, prompt_ids, params, req, request_id)
            return JSONResponse(job.response(finals))

        return await cancel_on_disconnect(raw, run)


class _Job:
    """One completions request (possibly several prompts) being turned into OpenAI objects."""

    def __init__(
        self,
        serving: ServingCompletion,
        req: CompletionRequest,
        request_id: str,
        created: int,
        prompt_ids: list[list[int]],
        prompt_texts: list[str | None],
    ) -> None:
        self.s = serving.s
        self.req = req
        self.prompt_ids = prompt_ids
        self.prompt_texts = prompt_texts
        self.head = {
            "id": request_id,
            "object": "text_completion",
            "created": created,
            "model": self.s.reported_model(req.model),
        }

    def _echo_text(self, p: int) -> str:
        text = self.prompt_texts[p]
        if text is None:
            text = self.s.tokenizer.decode(self.prompt_ids[p])
            self.prompt_texts[p] = text
        return text

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        req = self.req
        choices = []
        for p, out in enumerate(finals):
            echo = self._echo_text(p) if req.echo else ""
            prompt_logprobs = prompt_logprobs_json(out, req.returned_prompt_logprobs)
            for c in sorted(out.outputs, key=lambda c: c.index):
                text, token_ids, token_logprobs = self._generated(c)
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self._logprobs(out, token_ids, token_logprobs, 0, echo=req.echo)
                choice = {
                    "index": p * req.n + c.index,
                    "text": echo + text,
                    "logprobs": logprobs,
                    "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason,
                    "prompt_logprobs": prompt_logprobs,
                }
                if req.return_token_ids:
                    choice.update(prompt_token_ids=out.prompt_token_ids, token_ids=token_ids)
                choices.append(choice)
        return {
            **self.head,
            "choices": choices,
            "usage": _usage(finals, req.echo_only),
            "system_fingerprint": None,
        }

    def _generated(self, c: CompletionOutput) -> tuple[str, list[int], SampleLogprobs | None]:
        """A choice's generated text, token ids and logprobs: none for an echo-only request,
        whose one sampled token (see ``create``) is not part of the answer."""
        if self.req.echo_only:
            return "", [], None
        return c.text, c.token_ids, c.logprobs

    async def stream(self, streams: list[RequestStream]) -> AsyncIterator[bytes]:
        req = self.req
        n = req.n
        include_usage, continuous = req.stream_usage(self.s.defaults.force_include_usage)
        head = self.head
        total = len(streams) * n
        text_pos = [0] * total
        token_pos = [0] * total
        offset = [0] * total  # characters sent so far, for text_offset
        started = [False] * total
        done = [False] * total
        finals: list[RequestOutput | None] = [None] * len(streams)
        gate = StreamGate(req.stream_interval)
        try:
            async for p, out in merged(streams):
                finals[p] = out
                if not gate.passes(out, p):
                    continue
                for c in out.outputs:
                    i = p * n + c.index
                    if done[i]:
                        continue
                    c_text, c_token_ids, c_logprobs = self._generated(c)
                    new_text = c_text[text_pos[i] :]
                    num_tokens = len(c_token_ids)
                    new_tokens = num_tokens > token_pos[i]
                    echo = not started[i] and req.echo
                    if not (new_text or echo or c.finish_reason is not None):
                        if req.logprobs is None or not new_tokens:
                            continue
                    logprobs = None
                    if req.logprobs is not None:
                        logprobs = self._logprobs(
                            out, c_token_ids, c_logprobs, token_pos[i], echo=echo, offset=offset[i]
                        )
                    text = (self._echo_text(p) if echo else "") + new_text
                    first, token_start = not started[i], token_pos[i]
                    started[i] = True
                    text_pos[i] = len(c_text)
                    token_pos[i] = num_tokens
                    offset[i] += len(text)
                    done[i] = c.finish_reason is not None
                    choice = {
                        "index": i,
                        "text": text,
                        "logprobs": logprobs,
                        "finish_reason": c.finish_reason,
                        "stop_reason": c.stop_reason,
                    }
                    if req.return_token_ids:
                        choice["token_ids"] = c_token_ids[token_start:num_tokens]
                        if first:
                            choice["prompt_token_ids"] = out.prompt_token_ids
                    obj = {**head, "choices": [choice]}
                    if include_usage:  # continuous: the choice's usage so far
                        prompt_len = len(out.prompt_token_ids)
                        obj["usage"] = usage_so_far(prompt_len, num_tokens) if continuous else None
                    yield sse(obj)
        except EngineError as exc:
            yield sse(error_body(str(exc), "server_error", None, 500))
            yield SSE_DONE
            return
        if include_usage and all(f is not None for f in finals):
            usage = _usage(finals, req.echo_only)  # type: ignore[arg-type]
            yield sse({**head, "choices": [], "usage": usage})
        yield SSE_DONE

    def _logprobs(
        self,
        out: RequestOutput,
        token_ids: list[int],
        logprobs: list[dict[int, Logprob]] | None,
        start: int,
        echo: bool,
        offset: int = 0,
    ) -> dict[str, Any]:
        """OpenAI's completions layout; with echo, the prompt's tokens come first."""
        label = self.s.token_labeler(self.req.return_tokens_as_token_ids)
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        text_offset: list[int] = []

        def add(token_id: int, alternatives: dict[int, Logprob] | None) -> None:
            nonlocal offset
            chosen = alternatives.get(token_id) if alternatives else None
            text = label(chosen, token_id)
            tokens.append(text)
            token_logprobs.append(clamp_logprob(chosen.logprob) if chosen else None)
            top_logprobs.append(
                {
                    label(lp, tid): clamp_logprob(lp.logprob)
                    for tid, lp in sorted(alternatives.items(), key=by_rank)
                }
                if alternatives
                else None
            )
            text_offset.append(offset)
            offset += len(text)

        if echo:
            prompt_logprobs = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
            for token_id, alternatives in zip(out.prompt_token_ids, prompt_logprobs, strict=False):
                if alternatives is not None:
                    alternatives = top_alternatives(alternatives, self.req.logprobs or 0, token_id)
                add(token_id, alternatives)
        if logprobs is not None:
            for token_id, alternatives in zip(token_ids[start:], logprobs[start:], strict=False):
                add(token_id, alternatives)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": text_offset,
        }


def _usage(finals: list[RequestOutput], echo_only: bool) -> dict[str, Any]:
    """Token counts; an echo-only request completes no tokens."""
    completed = 0 if echo_only else sum(len(c.token_ids) for f in finals for c in f.outputs)
    return usage_dict(
        sum(len(f.prompt_token_ids) for f in finals),
        completed,
        sum(f.num_cached_tokens or 0 for f in finals),
    )
