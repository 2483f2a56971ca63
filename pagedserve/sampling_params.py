"""Sampling parameters of one request, validated in one place."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from pagedserve.sample.repetition import RepetitionDetectionParams

MAX_LOGPROB_TOKEN_IDS = 128  # the most tokens logprob_token_ids may name, as vLLM's limit


@dataclass
class StructuredOutputsParams:
    """A constraint on the output text (vLLM's ``structured_outputs``); exactly one of ``json``
    (a JSON schema, as a dict or its text), ``regex``, ``choice`` (the output is one of these
    strings), ``grammar`` (a context-free grammar in GBNF, llama.cpp's and vLLM's EBNF form with
    ``root ::= ...``, or in Lark with ``start: ...``) or ``json_object`` (any JSON object) is set.

    ``structural_tag`` (vLLM's, as its ``guidance`` backend takes it; a dict or its JSON text)
    leaves the text free until one of its ``triggers`` appears, then holds what follows to one of
    its ``structures``: ``begin``, JSON matching ``schema``, ``end``; tool calls in running text.

    ``disable_any_whitespace``: JSON is written compactly, with no whitespace between tokens
    (by default a model may put whitespace wherever JSON allows it, as vLLM does)."""

    json: str | dict[str, Any] | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    structural_tag: str | dict[str, Any] | None = None
    disable_any_whitespace: bool = False

    def __post_init__(self) -> None:
        given = self._given()
        if len(given) != 1:
            raise ValueError(
                "structured_outputs needs exactly one of json, regex, choice, grammar, "
                "json_object or structural_tag, "
                f"got {', '.join(given) or 'none'}"
            )
        if self.choice is not None and (
            not self.choice or any(not isinstance(c, str) or c == "" for c in self.choice)
        ):
            raise ValueError("structured_outputs.choice must be a list of non-empty strings")

    def _given(self) -> list[str]:
        return [
            name
            for name in ("json", "regex", "choice", "grammar", "json_object", "structural_tag")
            if getattr(self, name) not in (None, False)
        ]

    @property
    def kind(self) -> str:
        """Which constraint this is: ``json``, ``regex``, ``choice``, ``grammar``,
        ``json_object`` or ``structural_tag``."""
        return self._given()[0]


@dataclass
class SamplingParams:
    """How to sample the completion of one prompt (the fields and defaults of vLLM's).

    Every field is checked in ``__post_init__``; a bad value raises ``ValueError`` naming the field.
    ``temperature == 0`` means greedy.
    """

    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    max_tokens: int | None = 16
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    spaces_between_special_tokens: bool = True
    # Special tokens (by text) the text keeps when ``skip_special_tokens`` drops the others: the
    # markers a server's parsers read (Magistral's [THINK], Mistral's [TOOL_CALLS]), as vLLM's
    # parsers keep theirs and drop the rest; empty: skip_special_tokens alone decides
    kept_special_tokens: frozenset[str] = frozenset()
    include_stop_str_in_output: bool = False
    logit_bias: dict[int, float] | None = None
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None
    detokenize: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    # A reasoning model thinks at most this many tokens, then its end-of-thinking marker is
    # forced (the engine needs a reasoning parser); -1 or None: no limit
    thinking_token_budget: int | None = None
    # Stop an answer that ends in a repeated pattern (finish_reason "repetition"); None: off
    repetition_detection: RepetitionDetectionParams | None = None
    # At each sampled position, the logprobs of these tokens in place of the best ``logprobs``
    # ones (vLLM's, for scoring a fixed set of labels); implies logprobs
    logprob_token_ids: list[int] | None = None
    stop_strings: list[str] = field(init=False, repr=False)
    # The token sequences of bad_words, set by the engine (it has the tokenizer) on admission.
    bad_words_token_ids: list[list[int]] = field(init=False, repr=False)
    # What the sampler derives from the per-token fields (tensors of logit_bias,
    # allowed_token_ids and the stop tokens, an index of bad_words_token_ids), built on a
    # request's first step rather than from the Python lists at every step (sample.metadata).
    sampler_cache: dict[str, Any] = field(
        init=False, repr=False, compare=False, default_factory=dict
    )

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_strings = [self.stop]
        else:
            self.stop_strings = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.kept_special_tokens = frozenset(self.kept_special_tokens)
        self.bad_words_token_ids = []
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        if self.top_k is None or self.top_k == -1:
            self.top_k = 0
        if self.thinking_token_budget == -1:
            self.thinking_token_budget = None
        if self.logprob_token_ids is not None and self.logprobs is None:
            self.logprobs = 0
        self._validate()

    def _validate(self) -> None:
        def fail(name: str, why: str) -> None:
            raise ValueError(f"{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.n, int) or self.n < 1:
            fail("n", "must be an integer >= 1")
        if not -2.0 <= self.presence_penalty <= 2.0:
            fail("presence_penalty", "must be in [-2, 2]")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            fail("frequency_penalty", "must be in [-2, 2]")
        if not 0.0 < self.repetition_penalty <= 1e4:
            fail("repetition_penalty", "must be in (0, 1e4]")
        if not 0.0 <= self.temperature <= 1e4:
            fail("temperature", "must be in [0, 1e4]")
        if not 0.0 < self.top_p <= 1.0:
            fail("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            fail("top_k", "must be 0 or -1 (disabled) or a positive integer")
        if not 0.0 <= self.min_p <= 1.0:
            fail("min_p", "must be in [0, 1]")
        if self.max_tokens is not None and (
            not isinstance(self.max_tokens, int) or self.max_tokens < 1
        ):
            fail("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            fail("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            fail("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                fail(name, "must be an integer >= 0")
        if self.seed is not None and (
            not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63
        ):
            fail("seed", "must be an integer that fits in 64 bits")
        if any(not isinstance(s, str) or s == "" for s in self.stop_strings):
            fail("stop", "must be non-empty strings")
        if self.stop_strings and not self.detokenize:
            fail("stop", "needs detokenize: stop strings are matched in the text")
        if self.logit_bias and any(not -100.0 <= b <= 100.0 for b in self.logit_bias.values()):
            fail("logit_bias", "values must be in [-100, 100]")
        if self.allowed_token_ids is not None and len(self.allowed_token_ids) == 0:
            fail("allowed_token_ids", "must not be empty")
        if self.bad_words is not None and (
            not isinstance(self.bad_words, list)
            or any(not isinstance(w, str) or not w.strip() for w in self.bad_words)
        ):
            fail("bad_words", "must be non-empty strings")
        listed = self.logprob_token_ids
        if listed is not None and (
            not isinstance(listed, list)
            or not 1 <= len(listed) <= MAX_LOGPROB_TOKEN_IDS
            or any(isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in listed)
        ):
            fail(
                "logprob_token_ids",
                f"must be a list of 1 to {MAX_LOGPROB_TOKEN_IDS} token ids",
            )
        budget = self.thinking_token_budget
        if budget is not None and (
            isinstance(budget, bool) or not isinstance(budget, int) or budget < 0
        ):
            fail("thinking_token_budget", "must be an integer >= 0, or -1 for no limit")

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature < 1e-5
