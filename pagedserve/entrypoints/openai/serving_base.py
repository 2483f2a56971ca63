"""What chat, completions and tokenize have in common: the model name, prompts, limits, submission."""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from pagedserve.engine.async_engine import (
    AsyncEngine,
    EngineDeadError,
    RequestStream,
)
from pagedserve.engine.beam_search import request_output, search
from pagedserve.entrypoints.openai.chat_message import template_message
from pagedserve.entrypoints.openai.errors import APIError, bad_request, from_value_error
from pagedserve.entrypoints.openai.priority import check_priority_range
from pagedserve.entrypoints.openai.protocol import SamplingFields
from pagedserve.entrypoints.openai.streams import last_output
from pagedserve.entrypoints.openai.tool_parsers import TOOL_PARSERS
from pagedserve.lora.manager import LoRAAdapterUnloadedError
from pagedserve.lora.request import LoRARequest
from pagedserve.outputs import Logprob, RequestOutput
from pagedserve.reasoning_parsers import REASONING_PARSERS
from pagedserve.sample.thinking_budget import ThinkingMarkers
from pagedserve.sampling_params import SamplingParams

SAMPLING_PARAM_NAMES = set(SamplingParams.__dataclass_fields__) | {"max_completion_tokens"}

INLINE_TOKENIZE_CHARS = 16_384


def new_id(prefix: str, sep: str = "-", given: str | None = None) -> str:
    """A unique id: ``chatcmpl-...`` for chat and completions, ``resp_...`` (``sep="_"``) for the
    Responses API's objects, as OpenAI writes them; ``given``: the client's id instead of a
    random one (as vLLM: an ``X-Request-Id`` header, else the body's ``request_id``)."""
    return f"{prefix}{sep}{given or uuid.uuid4().hex}"


def header_priority(headers: Mapping[str, str], given: int) -> int:
    """The request's priority: vLLM's ``X-Vllm-Priority`` header (a router's) over the body's
    ``priority``; a header that is not an integer is ignored, as vLLM ignores it, and one outside
    the 64-bit range is the body field's 400."""
    try:
        value = int(headers["x-vllm-priority"])
    except (KeyError, ValueError):
        return given
    return check_priority_range(value)


class ChatFields(Protocol):
    """The fields of a request that carries a conversation (chat, /tokenize, embeddings)."""

    messages: Any
    add_generation_prompt: bool
    continue_final_message: bool
    chat_template: str | None
    chat_template_kwargs: dict[str, Any] | None


@dataclass
class ApiDefaults:
    """What the server's flags set for every request (vLLM's flags of the same names)."""

    response_role: str = "assistant"  # a chat answer's role, after a generation prompt
    return_tokens_as_token_ids: bool = False  # logprobs name tokens "token_id:N"
    force_include_usage: bool = False  # every stream ends with its usage
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # under the request's
    # A request's own chat_template is run only with --trust-request-chat-template: a Jinja
    # template can take the whole machine's memory or time (vLLM refuses them too).
    trust_request_chat_template: bool = False


class OpenAIServing:
    """Shared state and helpers of the OpenAI endpoints."""

    def __init__(
        self,
        engine: AsyncEngine,
        served_model_names: list[str],
        tool_parser: str | None = None,
        reasoning_parser: str | None = None,
        lora_modules: list[LoRARequest] | None = None,
        defaults: ApiDefaults | None = None,
    ) -> None:
        self.engine = engine
        self.defaults = defaults or ApiDefaults()
        self.served_model_names = served_model_names
        # Adapter name -> adapter: a request whose model names one runs with it.
        self.lora_modules = {m.lora_name: m for m in lora_modules or []}
        self.tool_parser = tool_parser  # the parser of tool_choice "auto"; None refuses it
        # Tool call ids in the format the parser's model family needs (Mistral); None: each
        # endpoint's own.
        self.parser_call_id = TOOL_PARSERS[tool_parser].new_call_id if tool_parser else None
        # Splits a reasoning model's thinking from its answer; None: the text is all content.
        self.reasoning = REASONING_PARSERS[reasoning_parser] if reasoning_parser else None
        self.model_name = served_model_names[0]
        self.tokenizer = engine.tokenizer
        # Its markers in tokens, to count an answer's reasoning_tokens
        self.thinking = (
            ThinkingMarkers.of(self.reasoning, self.tokenizer) if self.reasoning else None
        )
        self.max_model_len = engine.max_model_len
        self.max_logprobs = engine.max_logprobs
        self.sampling_defaults = engine.sampling_defaults
        self.vocab_size = len(self.tokenizer)
        self._token_text = lru_cache(maxsize=1 << 16)(self._decode_one)

    # ---- checks ----
    def check_model(self, name: str | None) -> None:
        if (
            name is not None
            and name not in self.served_model_names
            and name not in self.lora_modules
        ):
            raise APIError(
                404,
                f"The model `{name}` does not exist.",
                param="model",
                code="model_not_found",
            )

    def reported_model(self, name: str | None) -> str:
        """The ``model`` an answer names: the adapter asked for, else the base model."""
        return name if name in self.lora_modules else self.model_name

    def check_token_ids(self, ids: list[int], param: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise bad_request(
                f"{param} contains token id {bad}, outside the vocabulary [0, {self.vocab_size})",
                param=param,
            )

    def sampling_params(
        self,
        request: SamplingFields,
        requested_max_tokens: int | None,
        prompt_len: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        prompt_param: str = "prompt",
        logprobs_param: str = "logprobs",
    ) -> SamplingParams:
        """SamplingParams for one prompt; a 400 when a value or the context length is wrong."""
        for param, ids in request.token_ids_to_check().items():
            self.check_token_ids(ids, param)
        for param, wanted in ((logprobs_param, logprobs), ("prompt_logprobs", prompt_logprobs)):
            if isinstance(wanted, int) and wanted > self.max_logprobs:
                raise bad_request(
                    f"{param} {wanted} is more than this server returns: {self.max_logprobs} "
                    "(--max-logprobs)",
                    param=param,
                )
        limit = self.max_model_len
        if prompt_len >= limit:
            raise bad_request(
                f"This model's maximum context length is {limit} tokens. However, your "
                f"{prompt_param} resulted in {prompt_len} tokens, which leaves no room for the "
                f"completion. Please reduce the length of the {prompt_param}.",
                param=prompt_param,
                code="context_length_exceeded",
            )
        max_tokens = requested_max_tokens
        if max_tokens is None:
            max_tokens = min(limit - prompt_len, self.sampling_defaults.get("max_tokens", limit))
        elif isinstance(max_tokens, int) and max_tokens > limit:
            raise bad_request(
                f"max_tokens {max_tokens} is more than this model's maximum context length, "
                f"{limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        elif isinstance(max_tokens, int) and max_tokens >= 1:
            # As vLLM: what the prompt leaves of the context bounds the completion (its
            # finish_reason is then "length"); OpenAI would refuse the request instead.
            max_tokens = min(max_tokens, limit - prompt_len)
        try:
            return request.sampling_params(
                max_tokens, logprobs, prompt_logprobs, self.sampling_defaults
            )
        except ValueError as exc:
            raise from_value_error(exc, SAMPLING_PARAM_NAMES) from exc

    async def final_outputs(
        self,
        request_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        request: SamplingFields,
        client_id: str | None = None,
    ) -> list[RequestOutput]:
        """Each prompt's finished output: one engine request each, or with ``use_beam_search``
        a beam search whose steps are engine requests (:mod:`pagedserve.engine.beam_search`).
        ``client_id``: the answer's id, by which ``/abort_requests`` finds its requests."""
        if not request.use_beam_search:
            streams = await self.submit_all(request_id, prompts, params, request, client_id)
            try:
                return [await last_output(stream) for stream in streams]
            finally:
                for stream in streams:
                    stream.abort()
        ids = (
            [request_id]
            if len(prompts) == 1
            else [f"{request_id}-{i}" for i in range(len(prompts))]
        )
        searches = (
            self._beam_search(i, ids_, p, request, client_id)
            for i, ids_, p in zip(ids, prompts, params, strict=True)
        )
        return list(await asyncio.gather(*searches))

    async def _beam_search(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        request: SamplingFields,
        client_id: str | None,
    ) -> RequestOutput:
        beam = request.beam_search_params(params)
        steps = search(prompt_ids, beam, self.engine.eos_token_ids)
        sequences = next(steps)
        step_params = beam.step_params()
        for k in itertools.count():
            streams = await self.submit_all(
                f"{request_id}-step{k}",
                sequences,
                [step_params] * len(sequences),
                request,
                client_id,
            )
            outputs = await asyncio.gather(*(last_output(stream) for stream in streams))
            if any(out.outputs[0].finish_reason == "abort" for out in outputs):
                raise APIError(503, "the request was aborted (/abort_requests or /pause)")
            try:
                sequences = steps.send([out.outputs[0].logprobs[0] for out in outputs])
            except StopIteration as done:
                beams = done.value
                break
        return request_output(request_id, None, prompt_ids, beams, self.tokenizer, beam)

    # ---- prompts ----
    async def tokenize(self, text: str, add_special_tokens: bool) -> list[int]:
        """Token ids of ``text``; a long text is encoded on a worker thread (the Rust tokenizer
        releases the GIL there), so a huge prompt does not stall every stream for seconds."""
        if len(text) < INLINE_TOKENIZE_CHARS:
            return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)
        return await asyncio.to_thread(
            self.tokenizer.encode, text, add_special_tokens=add_special_tokens
        )

    def render_chat(self, req: ChatFields, tools: list[dict[str, Any]] | None = None) -> str:
        """A request's conversation as prompt text, through the model's (or the request's)
        chat template, which also sees ``tools`` (templates of tool-calling models list them
        for the model)."""
        messages, chat_template = req.messages, req.chat_template
        add_generation_prompt = req.add_generation_prompt
        continue_final_message = req.continue_final_message
        chat_template_kwargs = req.chat_template_kwargs
        if not messages:
            raise bad_request("messages must contain at least one message", param="messages")
        if add_generation_prompt and continue_final_message:
            raise bad_request(
                "continue_final_message and add_generation_prompt can not both be true; "
                "set add_generation_prompt to false to continue the final message",
                param="continue_final_message",
            )
        if continue_final_message and messages[-1].role != "assistant":
            raise bad_request(
                "continue_final_message needs the last message to be an assistant message",
                param="continue_final_message",
            )
        given = chat_template is not None or "chat_template" in (chat_template_kwargs or {})
        if given and not self.defaults.trust_request_chat_template:
            raise bad_request(
                "Chat template is passed with request, but --trust-request-chat-template is not "
                "set. Refused request with untrusted chat template.",
                param="chat_template",
            )
        conversation = [template_message(m, i) for i, m in enumerate(messages)]
        if chat_template is None and not getattr(self.tokenizer, "chat_template", None):
            raise bad_request(
                "this model has no chat template; start the server with --chat-template",
                param="messages",
            )
        effort = getattr(req, "reasoning_effort", None)
        thinking = {} if effort is None else {"reasoning_effort": effort}
        if effort is not None and "enable_thinking" not in (chat_template_kwargs or {}):
            thinking["enable_thinking"] = effort != "none"
        kwargs = {**self.defaults.chat_template_kwargs, **thinking, **(chat_template_kwargs or {})}
        for reserved in ("conversation", "tokenize", "chat_template", "return_dict", "documents"):
            kwargs.pop(reserved, None)
        try:
            text = self.tokenizer.apply_chat_template(
                conversation,
                chat_template=chat_template,
                tokenize=False,
                add_generation_prompt=add_generation_prompt,
                continue_final_message=continue_final_message,
                tools=tools,
                documents=getattr(req, "documents", None),
                **kwargs,
            )
        except RecursionError as exc:  # transformers walks tool schemas and kwargs recursively
            raise bad_request(
                "could not apply the chat template: the messages, tools or "
                "chat_template_kwargs are nested too deeply",
                param="messages",
            ) from exc
        except Exception as exc:  # noqa: BLE001 - whatever the template raises (1/0 too) is a 400
            raise bad_request(
                f"could not apply the chat template: {type(exc).__name__}: {exc}", param="messages"
            ) from exc
        return text if isinstance(text, str) else text[0]

    def token_text(self, token_id: int) -> str:
        """The text of one token (for logprobs), cached."""
        return self._token_text(token_id)

    def token_labeler(self, as_ids: bool) -> Callable[[Logprob | None, int], str]:
        """How logprobs name a token: by its text, or with vLLM's ``return_tokens_as_token_ids``
        as ``"token_id:N"``, which names even a token whose bytes are not valid UTF-8 alone."""
        if as_ids or self.defaults.return_tokens_as_token_ids:
            return lambda _, token_id: f"token_id:{token_id}"

        def text(logprob: Logprob | None, token_id: int) -> str:
            if logprob is not None and logprob.decoded_token is not None:
                return logprob.decoded_token
            return self.token_text(token_id)

        return text

    def _decode_one(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id])

    # ---- running requests ----
    async def submit(
        self,
        request_id: str,
        prompt_ids: list[int],
        params: SamplingParams,
        arrival_time: float,
        cache_salt: str | None,
        priority: int,
        lora_request: LoRARequest | None = None,
        client_id: str | None = None,
    ) -> RequestStream:
        try:
            return await self.engine.add_request(
                request_id,
                prompt_ids,
                params,
                arrival_time,
                cache_salt,
                priority,
                lora_request,
                client_id,
            )
        except LoRAAdapterUnloadedError as exc:  # unloaded since the request was routed to it
            raise APIError(404, str(exc), param="model", code="model_not_found") from exc
        except ValueError as exc:
            raise from_value_error(exc, SAMPLING_PARAM_NAMES) from exc
        except EngineDeadError as exc:
            raise APIError(503, str(exc)) from exc

    def check_priority(self, priority: int) -> None:
        """A 400 for a non-zero priority on a server that serves requests in arrival order."""
        if priority != 0 and self.engine.scheduling_policy != "priority":
            raise bad_request(
                "priority needs a server started with --scheduling-policy priority; this one "
                "serves requests in arrival order",
                param="priority",
            )

    async def submit_all(
        self,
        base_id: str,
        prompts: list[list[int]],
        params: list[SamplingParams],
        request: SamplingFields,
        client_id: str | None = None,
    ) -> list[RequestStream]:
        """Submit several prompts (with ``request``'s cache salt and priority) as the answer
        ``client_id``; on a refusal, abort the ones already accepted."""
        self.check_priority(request.priority)
        now = time.time()
        salt, priority = request.cache_salt, request.priority
        self.check_model(request.model)  # an adapter may have been unloaded meanwhile
        lora = self.lora_modules.get(request.model) if request.model else None
        run = (now, salt, priority, lora, client_id)
        if len(prompts) == 1:
            return [await self.submit(base_id, prompts[0], params[0], *run)]
        streams: list[RequestStream] = []
        try:
            for i, (ids, p) in enumerate(zip(prompts, params, strict=True)):
                streams.append(await self.submit(f"{base_id}-{i}", ids, p, *run))
        except BaseException:
            for stream in streams:
                stream.abort()
            raise
        return streams


def usage_so_far(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    """A streamed chunk's usage with vLLM's ``continuous_usage_stats``."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def usage_dict(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    details = {"prompt_tokens_details": {"cached_tokens": cached_tokens}}
    return {**usage_so_far(prompt_tokens, completion_tokens), **details}


def by_rank(item: tuple[int, Logprob]) -> float:
    """Sort key of a logprobs dict's items: best rank first (the sampled token may be unranked)."""
    rank = item[1].rank
    return float("inf") if rank is None else rank


def clamp_logprob(value: float) -> float:
    """JSON has no -inf; like vLLM, report at least -9999."""
    return value if value > -9999.0 else -9999.0


def top_alternatives(alternatives: dict[int, Logprob], n: int, token_id: int) -> dict[int, Logprob]:
    """``token_id``'s entry and the ``n`` best of a logprobs dict (which may hold more: the engine
    computes a prompt's alternatives once, for the largest number any field of the request asks)."""
    return {
        tid: lp
        for tid, lp in alternatives.items()
        if tid == token_id or (lp.rank is not None and lp.rank <= n)
    }


def prompt_logprobs_json(out: RequestOutput, n: int | None) -> list[dict[str, Any] | None] | None:
    """vLLM's ``prompt_logprobs``: per prompt token (null for the first, which nothing predicts)
    its logprob, rank and text and those of the ``n`` best tokens there, keyed by token id."""
    if n is None or out.prompt_logprobs is None:
        return None
    return [
        None
        if alternatives is None
        else {
            str(tid): {
                "logprob": clamp_logprob(lp.logprob),
                "rank": lp.rank,
                "decoded_token": lp.decoded_token,
            }
            for tid, lp in top_alternatives(alternatives, n, token_id).items()
        }
        for token_id, alternatives in zip(out.prompt_token_ids, out.prompt_logprobs, strict=False)
    ]
