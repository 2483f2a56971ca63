"""Per-request output state: detokenized text, logprobs, stop checks and RequestOutput objects."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pagedserve.engine.detokenizer import IncrementalDetokenizer
from pagedserve.engine.request import Request, RequestStatus
from pagedserve.outputs import CompletionOutput, Logprob, RequestOutput
from pagedserve.sample.repetition import ends_in_repetition
from pagedserve.sample.sampler import NO_TOKEN, LogprobsEntry
from pagedserve.sampling_params import SamplingParams


@dataclass
class SequenceState:
    """What the user sees of one sequence: its text so far and its logprobs."""

    request: Request
    detokenizer: IncrementalDetokenizer | None
    logprobs: list[dict[int, Logprob]] | None
    cumulative_logprob: float | None = None


@dataclass
class RequestGroup:
    """A user request: one prompt and its ``n`` sequences (one until the prompt is computed)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    params: SamplingParams
    sequences: list[SequenceState] = field(default_factory=list)
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None  # [None, ...] when asked

    def __post_init__(self) -> None:
        if self.params.prompt_logprobs is not None:
            self.prompt_logprobs = [None]

    @property
    def finished(self) -> bool:
        return len(self.sequences) == self.params.n and all(
            s.request.is_finished for s in self.sequences
        )


class OutputProcessor:
    """Applies sampled tokens to sequences and decides when they stop."""

    def __init__(self, tokenizer, eos_token_ids: set[int], max_model_len: int) -> None:
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.max_model_len = max_model_len

    def new_sequence(self, request: Request) -> SequenceState:
        params = request.params
        detok = (
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, params)
            if params.detokenize
            else None
        )
        logprobs = [] if params.logprobs is not None else None
        cumulative = 0.0 if params.logprobs is not None else None
        return SequenceState(request, detok, logprobs, cumulative)

    def append(
        self, seq: SequenceState, token_id: int, entry: LogprobsEntry | None
    ) -> RequestStatus | None:
        """Add a sampled token; return the finish status if the sequence is done (an error
        when its constraints left no token to sample)."""
        req = seq.request
        if token_id == NO_TOKEN:
            return RequestStatus.FINISHED_ERROR
        req.append_token(token_id)
        params = req.params
        if entry is not None and seq.logprobs is not None:
            seq.logprobs.append(logprob_dict(self._decoder(seq), token_id, entry))
            seq.cumulative_logprob += entry.logprob
        may_stop = req.num_output_tokens >= params.min_tokens
        status: RequestStatus | None = None
        if may_stop and not params.ignore_eos and token_id in self.eos_token_ids:
            status = RequestStatus.FINISHED_STOPPED
        elif may_stop and token_id in params.stop_token_ids:
            req.stop_reason = token_id
            status = RequestStatus.FINISHED_STOPPED
        if seq.detokenizer is not None:
            stop_str = seq.detokenizer.append([token_id], stop_terminated=status is not None)
            if status is None and stop_str is not None:
                req.stop_reason = stop_str
                status = RequestStatus.FINISHED_STOPPED
        if status is None and (
            (params.max_tokens is not None and req.num_output_tokens >= params.max_tokens)
            or req.num_tokens >= self.max_model_len
        ):
            status = RequestStatus.FINISHED_LENGTH
        repetition = params.repetition_detection
        if status is None and may_stop and repetition is not None:
            if ends_in_repetition(req.output_token_ids, repetition):
                req.stop_reason = "repetition_detected"
                status = RequestStatus.FINISHED_REPETITION
        return status

    def _decoder(self, seq: SequenceState) -> Callable[[int], str]:
        return seq.detokenizer.decode_token if seq.detokenizer else lambda _: ""

    def add_prompt_logprobs(
        self, group: RequestGroup, start: int, entries: list[LogprobsEntry]
    ) -> None:
        """Record logprobs of prompt tokens ``start + 1 ...`` (once, even if recomputed)."""
        assert group.prompt_logprobs is not None
        decode = self._decoder(group.sequences[0])
        for pos, entry in enumerate(entries, start=start + 1):
            if pos == len(group.prompt_logprobs):
                group.prompt_logprobs.append(logprob_dict(decode, entry.token_id, entry))

    def make_output(self, group: RequestGroup, num_cached_tokens: int) -> RequestOutput:
        completions = []
        for seq in group.sequences:
            req = seq.request
            text = seq.detokenizer.output_text(req.is_finished) if seq.detokenizer else ""
            completions.append(
                CompletionOutput(
                    index=req.index,
                    text=text,
                    token_ids=list(req.output_token_ids),
                    cumulative_logprob=seq.cumulative_logprob,
                    logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                    finish_reason=req.finish_reason,
                    stop_reason=req.stop_reason,
                )
            )
        first = group.sequences[0].request
        return RequestOutput(
            request_id=group.request_id,
            prompt=group.prompt,
            prompt_token_ids=group.prompt_token_ids,
            outputs=completions,
            finished=group.finished,
            num_cached_tokens=num_cached_tokens,
            prompt_logprobs=group.prompt_logprobs,
            metrics=first.times.as_dict(),
        )


def logprob_dict(
    decode: Callable[[int], str], token_id: int, entry: LogprobsEntry
) -> dict[int, Logprob]:
    """The chosen token first, then the top-N by rank (vLLM's layout)."""
    out = {token_id: Logprob(entry.logprob, entry.rank, decode(token_id))}
    ranks = entry.top_ranks or range(1, len(entry.top) + 1)
    for rank, (tid, lp) in zip(ranks, entry.top, strict=True):
        if tid not in out:
            out[tid] = Logprob(lp, rank, decode(tid))
    return out
