"""Beam search on top of the engine, as vLLM runs it (``LLM.beam_search``, ``use_beam_search``).

Every step asks the engine for one token of each live beam, with the ``2 * beam_width`` most
likely next tokens and their logprobs (the prompt and the beam so far are a prefix the cache
mostly holds, so a step recomputes little more than the last partial block). Each beam's
candidates extend it; those that end with an eos token are set aside as finished, and the
``beam_width`` best of the rest by cumulative logprob live on. After ``max_tokens`` steps, or
when no beam is left, the ``beam_width`` best of all finished and live beams are the answer,
ranked by ``cumulative_logprob / generated_length ** length_penalty`` (the eos not counted).

The eos is the only thing that ends a beam (vLLM's beam search honours no stop strings or stop
token ids; the server refuses them). As in vLLM's served beam search, a finished beam's text
never shows its eos, and its token ids (and so its completion token count) keep the eos only with
``include_stop_str_in_output``; its ``stop_reason`` is that eos token.
"""

from __future__ import annotations

import math
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagedserve.engine.detokenizer import decoded
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sampling_params import SamplingParams

MAX_BEAM_WIDTH = 10  # 2 * width candidates a beam: the engine returns at most 20 logprobs


@dataclass(frozen=True)
class BeamSearchParams:
    beam_width: int
    max_tokens: int
    ignore_eos: bool = False
    length_penalty: float = 1.0
    skip_special_tokens: bool = True
    kept_special_tokens: frozenset[str] = frozenset()  # as SamplingParams'
    include_stop_str_in_output: bool = False  # a finished beam's token ids keep its eos

    def __post_init__(self) -> None:
        if not 1 <= self.beam_width <= MAX_BEAM_WIDTH:
            raise ValueError(f"beam_width must be in [1, {MAX_BEAM_WIDTH}], got {self.beam_width}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if not math.isfinite(self.length_penalty):
            raise ValueError(f"length_penalty must be a finite number, got {self.length_penalty}")

    def step_params(self) -> SamplingParams:
        """One token of one beam, with its best ``2 * beam_width`` alternatives."""
        return SamplingParams(
            temperature=0, max_tokens=1, ignore_eos=True, logprobs=2 * self.beam_width
        )


@dataclass
class Beam:
    tokens: list[int] = field(default_factory=list)  # generated so far
    cumulative_logprob: float = 0.0
    finished: bool = False  # ended with an eos token


def expand(
    beams: list[Beam],
    candidates: list[dict[int, Logprob]],
    params: BeamSearchParams,
    eos_token_ids: set[int],
) -> tuple[list[Beam], list[Beam]]:
    """The next live beams and the newly finished ones, from each beam's next-token logprobs."""
    live, done = [], []
    for beam, next_tokens in zip(beams, candidates, strict=True):
        for token, logprob in next_tokens.items():
            child = Beam([*beam.tokens, token], beam.cumulative_logprob + logprob.logprob)
            if token in eos_token_ids and not params.ignore_eos:
                child.finished = True
                done.append(child)
            else:
                live.append(child)
    live.sort(key=lambda b: b.cumulative_logprob, reverse=True)
    return live[: params.beam_width], done


def score(beam: Beam, length_penalty: float) -> float:
    length = max(1, len(beam.tokens) - int(beam.finished))
    try:
        divisor = length**length_penalty
    except OverflowError:  # a huge penalty: the length term is past float's range
        divisor = math.inf
    if divisor == 0.0:  # a hugely negative penalty: it underflows
        return math.copysign(math.inf, beam.cumulative_logprob) if beam.cumulative_logprob else 0.0
    return beam.cumulative_logprob / divisor


def best(beams: list[Beam], params: BeamSearchParams) -> list[Beam]:
    ranked = sorted(beams, key=lambda b: score(b, params.length_penalty), reverse=True)
    return ranked[: params.beam_width]


Search = Generator[list[list[int]], list[dict[int, Logprob]], list[Beam]]


def search(
    prompt_token_ids: list[int], params: BeamSearchParams, eos_token_ids: set[int]
) -> Search:
    """Beam search as a generator the caller drives: it yields the token sequences (prompt +
    beam) of one step and is sent back each one's next-token logprobs (``step_params``); it
    returns the best beams. One driver runs it on the offline engine, another on the server's,
    and several searches can share each step."""
    beams: list[Beam] = [Beam()]
    finished: list[Beam] = []
    for _ in range(params.max_tokens):
        candidates = yield [prompt_token_ids + b.tokens for b in beams]
        beams, done = expand(beams, candidates, params, eos_token_ids)
        finished += done
        if not beams:
            break
    return best(finished + beams, params)


def request_output(
    request_id: str,
    prompt: str | None,
    prompt_token_ids: list[int],
    beams: Sequence[Beam],
    tokenizer: Any,
    params: BeamSearchParams,
) -> RequestOutput:
    """The beams as a finished request's output, one completion each, best first."""
    outputs = []
    for i, beam in enumerate(beams):
        text_tokens = beam.tokens[:-1] if beam.finished else beam.tokens
        kept = beam.tokens if params.include_stop_str_in_output else text_tokens
        outputs.append(
            CompletionOutput(
                index=i,
                text=decoded(
                    tokenizer, text_tokens, params.skip_special_tokens, params.kept_special_tokens
                ),
                token_ids=list(kept),
                cumulative_logprob=beam.cumulative_logprob,
                logprobs=None,
                finish_reason="stop" if beam.finished else "length",
                stop_reason=beam.tokens[-1] if beam.finished else None,
            )
        )
    return RequestOutput(request_id, prompt, prompt_token_ids, outputs, finished=True)
