"""Request bodies of the OpenAI API (plus vLLM's extras) and their mapping to SamplingParams.

Fields have types only; value ranges are checked once, by ``SamplingParams``, whose ``ValueError``
becomes a 400. Unknown fields are ignored, as the OpenAI API does (``request_body``).
Responses are plain dicts built by the serving modules (cheaper per streamed chunk than pydantic
serialisation).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import Any, ClassVar, Literal

from pydantic import PrivateAttr, model_validator

from pagedserve.engine.beam_search import MAX_BEAM_WIDTH, BeamSearchParams
from pagedserve.entrypoints.openai.cache_salt import check_cache_salt
from pagedserve.entrypoints.openai.chat_message import ChatMessage
from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.inert_fields import ChatInertFields, CompletionInertFields
from pagedserve.entrypoints.openai.logprob_token_ids import LogprobTokenIdsField
from pagedserve.entrypoints.openai.priority import Priority
from pagedserve.entrypoints.openai.prompt_text import PromptTextField
from pagedserve.entrypoints.openai.request_body import RequestBody, StreamOptions
from pagedserve.entrypoints.openai.stream_interval import StreamIntervalField
from pagedserve.entrypoints.openai.structured_outputs_protocol import (
    ResponseFormat,
    StructuredOutputs,
    legacy_guided_fields,
    refuse_unsupported_constraint,
    structured_output_params,
)
from pagedserve.entrypoints.openai.tool_calls import (
    AUTO,
    forced_schema,
    refuse_beside_forced_calls,
    refuse_empty_tools,
    tool_mode,
)
from pagedserve.sample.repetition import RepetitionDetectionParams
from pagedserve.sample.structured_output import check_grammar
from pagedserve.sampling_params import SamplingParams, StructuredOutputsParams

MAX_N = 128  # OpenAI's limit on choices per request


class SamplingFields(RequestBody, StreamIntervalField, LogprobTokenIdsField):
    """The sampling fields shared by chat and completions (OpenAI's and vLLM's extras)."""

    @model_validator(mode="before")
    @classmethod
    def _legacy_guided_fields(cls, data: Any) -> Any:
        return legacy_guided_fields(data)

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    seed: int | None = None
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    # vLLM extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int = 0
    ignore_eos: bool = False
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    allowed_token_ids: list[int] | None = None
    prompt_logprobs: int | None = None
    return_token_ids: bool = False
    return_tokens_as_token_ids: bool = False
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None  # which end truncation cuts
    request_id: str | None = None  # the answer's id is the endpoint's prefix and this
    use_beam_search: bool = False
    length_penalty: float = 1.0
    priority: Priority = 0
    bad_words: list[str] | None = None
    cache_salt: str | None = None
    thinking_token_budget: int | None = None  # needs --reasoning-parser; -1: no limit
    repetition_detection: RepetitionDetectionParams | None = None

    # What beam search does not honour (it ranks the model's raw logprobs): a value other than
    # these defaults is a 400 beside use_beam_search.
    _NOT_IN_BEAM_SEARCH: ClassVar[dict[str, Any]] = {
        "stream": False,
        "logprobs": False,
        "echo": False,
        "prompt_logprobs": None,
        "response_format": None,
        "structured_outputs": None,
        "stop": None,
        "stop_token_ids": None,
        "min_tokens": 0,
        "bad_words": None,
        "thinking_token_budget": None,
        "repetition_detection": None,
        "logit_bias": None,
        "allowed_token_ids": None,
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "repetition_penalty": None,
    }

    def _refuse_beside_beam_search(self) -> None:
        for name, default in self._NOT_IN_BEAM_SEARCH.items():
            if not _unset(getattr(self, name, default), default):
                raise bad_request(f"{name} is not supported with use_beam_search", param=name)
        if not 1 <= self.n <= MAX_BEAM_WIDTH:
            raise bad_request(
                f"n (the beam width) must be in [1, {MAX_BEAM_WIDTH}] with use_beam_search",
                param="n",
            )
        if not math.isfinite(self.length_penalty):
            raise bad_request(
                f"length_penalty must be a finite number, got {self.length_penalty}",
                param="length_penalty",
            )

    def beam_search_params(self, params: SamplingParams) -> BeamSearchParams:
        """The beam search this request asks for, from its checked sampling parameters."""
        return BeamSearchParams(
            beam_width=params.n,
            max_tokens=params.max_tokens or 1,
            ignore_eos=params.ignore_eos,
            length_penalty=self.length_penalty,
            skip_special_tokens=params.skip_special_tokens,
            kept_special_tokens=params.kept_special_tokens,
            include_stop_str_in_output=params.include_stop_str_in_output,
        )

    def stream_usage(self, forced: bool) -> tuple[bool, bool]:
        """(a stream ends with a usage chunk, every chunk carries the usage so far); ``forced``:
        the server's ``--enable-force-include-usage``."""
        options = self.stream_options or StreamOptions()
        include = forced or bool(options.include_usage)
        return include, include and bool(options.continuous_usage_stats)

    @property
    def returned_prompt_logprobs(self) -> int | None:
        """How many alternatives ``prompt_logprobs`` (vLLM's extra) returns per prompt token, or
        None: none in a stream, where only 0 is accepted, as in vLLM."""
        return None if self.stream else self.prompt_logprobs

    def truncated(self, ids: list[int], max_model_len: int) -> list[int]:
        """The prompt cut to ``truncate_prompt_tokens`` tokens (see :func:`truncated`)."""
        return truncated(ids, self.truncate_prompt_tokens, max_model_len, self.truncation_side)

    def sampling_params(
        self,
        max_tokens: int,
        logprobs: int | None,
        prompt_logprobs: int | None = None,
        defaults: Mapping[str, Any] = MappingProxyType({}),
    ) -> SamplingParams:
        """Build (and so validate) the engine's SamplingParams; ValueError on a bad value.
        ``defaults``: the model's values (its generation config) for the fields left out."""
        if isinstance(self.n, int) and self.n > MAX_N:
            raise bad_request(f"n must be at most {MAX_N}, got {self.n}", param="n")

        def given(name: str, fallback: float) -> Any:
            value = getattr(self, name)
            return defaults.get(name, fallback) if value is None else value

        return SamplingParams(
            n=self.n,
            temperature=given("temperature", 1.0),
            top_p=given("top_p", 1.0),
            top_k=given("top_k", 0),
            min_p=given("min_p", 0.0),
            presence_penalty=given("presence_penalty", 0.0),
            frequency_penalty=given("frequency_penalty", 0.0),
            repetition_penalty=given("repetition_penalty", 1.0),
            seed=self.seed,
            stop=self.stop,
            stop_token_ids=self.stop_token_ids,
            ignore_eos=self.ignore_eos,
            max_tokens=max_tokens,
            min_tokens=self.min_tokens,
            logprobs=logprobs,
            prompt_logprobs=prompt_logprobs,
            skip_special_tokens=self.skip_special_tokens,
            spaces_between_special_tokens=self.spaces_between_special_tokens,
            include_stop_str_in_output=self.include_stop_str_in_output,
            logit_bias=_logit_bias(self.logit_bias),
            allowed_token_ids=self.allowed_token_ids,
            bad_words=self.bad_words,
            structured_outputs=self.structured_output_params(),
            thinking_token_budget=self.thinking_token_budget,
            repetition_detection=self.repetition_detection,
            logprob_token_ids=self.logprob_token_ids or None,
        )

    def structured_output_params(self) -> StructuredOutputsParams | None:
        return structured_output_params(self.response_format, self.structured_outputs)

    def refuse_unsupported(self) -> None:
        """A 400 for what the engine cannot honour yet, rather than output that silently ignores
        it (a client that asks for JSON must not be handed free text); checked first, before any
        tokenizing."""
        check_cache_salt(self.cache_salt)
        if self.use_beam_search:
            self._refuse_beside_beam_search()
        if self.stream and self.prompt_logprobs:
            raise bad_request(
                "prompt_logprobs is not available when stream is true", param="prompt_logprobs"
            )
        if self.stream_options is not None and not self.stream:
            raise bad_request(
                "stream_options can only be given when stream is true", param="stream_options"
            )
        refuse_unsupported_constraint(self.response_format, self.structured_outputs)

    def token_ids_to_check(self) -> dict[str, list[int]]:
        """Token ids given by the client, by field, to check against the vocabulary."""
        fields: dict[str, list[int]] = {}
        if self.stop_token_ids:
            fields["stop_token_ids"] = self.stop_token_ids
        if self.allowed_token_ids:
            fields["allowed_token_ids"] = self.allowed_token_ids
        if self.logit_bias:
            fields["logit_bias"] = list(_logit_bias(self.logit_bias) or {})
        return fields


def truncated(
    ids: list[int], keep: int | None, max_model_len: int, side: str | None = None
) -> list[int]:
    """A prompt's last ``keep`` tokens (vLLM's ``truncate_prompt_tokens``, a left truncation;
    -1: as many as the context holds), its first with ``side`` ``"right"``, or all of them when
    ``keep`` is None."""
    keep = truncation_length(keep, max_model_len)
    if keep is None:
        return ids
    return ids[:keep] if side == "right" else ids[-keep:]


def truncation_length(keep: int | None, max_model_len: int) -> int | None:
    """How many tokens ``truncate_prompt_tokens`` keeps (-1: the context length); a 400 for a
    value outside -1 and [1, max_model_len]."""
    if keep is None or 1 <= keep <= max_model_len:
        return keep
    if keep == -1:
        return max_model_len
    raise bad_request(
        f"truncate_prompt_tokens must be -1 or in [1, {max_model_len}] (the context "
        f"length), got {keep}",
        param="truncate_prompt_tokens",
    )


def _unset(value: Any, default: Any) -> bool:
    """Whether a field holds its default (or nothing): ``0`` logprobs is not ``False``."""
    if value is None or value is False or value == []:
        return True
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return value == default


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    """By token id, each bias clamped to [-100, 100] as vLLM does (-1000 bans a token there); a
    400 for NaN, which the clamp would turn into a ban."""
    if not bias:
        return None
    if any(math.isnan(v) for v in bias.values()):
        raise bad_request("logit_bias values must be numbers, got NaN", param="logit_bias")
    try:
        return {int(k): min(100.0, max(-100.0, float(v))) for k, v in bias.items()}
    except ValueError as exc:
        raise bad_request(
            "logit_bias keys must be token ids (integers)", param="logit_bias"
        ) from exc


class ChatCompletionRequest(SamplingFields, ChatInertFields, PromptTextField):
    messages: list[ChatMessage]
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool | None = False
    top_logprobs: int | None = None
    # vLLM extras
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's reasoning_effort reaches the chat template, and "none" turns enable_thinking off
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh", "max"] | None = (
        None
    )
    include_reasoning: bool = True  # False: the reasoning parser's reasoning is left out
    documents: list[dict[str, Any]] | None = None  # for the chat templates of RAG models
    echo: bool = False  # the answer starts with the last message, when it has the answer's role

    _tool_mode: tuple[str, str] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _refuse_empty_tools(cls, data: Any) -> Any:
        return refuse_empty_tools(data)

    def resolve_tools(self, auto_parser: str | None) -> None:
        """Settle what ``tool_choice`` asks for (see ``tool_calls.tool_mode``), on a server whose
        parser for ``auto`` is ``auto_parser`` (None: ``auto`` is refused, as in vLLM without
        ``--enable-auto-tool-choice``). Call it before anything reads :attr:`tool_mode`."""
        self._tool_mode = tool_mode(self.tools, self.tool_choice, auto_parser)

    def refuse_unsupported(self) -> None:
        """As for every request, plus forced tool calls beside another constraint or beams."""
        super().refuse_unsupported()
        if self.forces_tool_calls:
            fmt = self.response_format
            given = self.structured_outputs is not None or (fmt is not None and fmt.type != "text")
            refuse_beside_forced_calls(given, self.use_beam_search)

    @property
    def tool_mode(self) -> tuple[str, str] | None:
        return self._tool_mode

    @property
    def forces_tool_calls(self) -> bool:
        return self._tool_mode is not None and self._tool_mode[0] != AUTO

    @property
    def constrained(self) -> bool:
        """Whether a grammar holds the answer from its first token: then nothing is reasoning."""
        fmt = self.response_format
        given = self.structured_outputs is not None or (fmt is not None and fmt.type != "text")
        return given or self.forces_tool_calls

    def structured_output_params(self) -> StructuredOutputsParams | None:
        """Forced tool calls hold the answer to the tools' schemas; else as every request."""
        mode = self.tool_mode
        if mode is None or mode[0] == AUTO:
            return super().structured_output_params()
        parallel = self.parallel_tool_calls is not False
        params = StructuredOutputsParams(json=forced_schema(self.tools or [], mode, parallel))
        try:
            check_grammar(params)
        except ValueError as exc:
            raise bad_request(f"a tool's parameters schema is not valid: {exc}", "tools") from exc
        return params

    @property
    def requested_max_tokens(self) -> int | None:
        return (
            self.max_completion_tokens
            if self.max_completion_tokens is not None
            else self.max_tokens
        )

    @property
    def num_logprobs(self) -> int | None:
        """The engine's ``logprobs`` (number of top alternatives) or None when not asked."""
        if not self.logprobs:
            if self.top_logprobs:
                raise bad_request("top_logprobs requires logprobs to be true", param="top_logprobs")
            return None
        top = self.top_logprobs or 0
        if top < 0:
            raise bad_request(f"top_logprobs must be >= 0, got {top}", param="top_logprobs")
        return top


Prompt = str | list[str] | list[int] | list[list[int]]


class CompletionRequest(SamplingFields, CompletionInertFields):
    prompt: Prompt
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    # vLLM extras
    add_special_tokens: bool = True

    @property
    def requested_max_tokens(self) -> int | None:
        return 16 if self.max_tokens is None else self.max_tokens  # null: the default, as vLLM

    @property
    def echo_only(self) -> bool:
        """``echo`` with ``max_tokens`` 0: the prompt comes back (with its logprobs if asked),
        nothing is generated; how clients score a text (lm-evaluation-harness's loglikelihood,
        as vLLM and OpenAI's legacy models answer it)."""
        return self.echo and self.max_tokens == 0

    def refuse_unsupported(self) -> None:
        """As for every request, plus ``suffix`` (insertion needs a fill-in-the-middle model)."""
        super().refuse_unsupported()
        if self.suffix:
            raise bad_request("suffix is not supported", param="suffix")

    def prompts(self) -> list[str | list[int]]:
        """The prompts as a list of strings or token-id lists (one entry per prompt)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if not prompt:
            raise bad_request("prompt must not be empty", param="prompt")
        if isinstance(prompt[0], int):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]
