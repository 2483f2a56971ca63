"""One sequence being generated: its tokens, progress, blocks and state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from pagedserve.pooling_params import PoolingParams
from pagedserve.sample.structured_output import LLMatcher
from pagedserve.sample.thinking_budget import ThinkingTracker
from pagedserve.sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # the output constraint failed (its grammar hit a limit)
    FINISHED_REPETITION = "repetition"  # its repetition_detection saw it loop

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_ERROR,
            RequestStatus.FINISHED_REPETITION,
        )


@dataclass
class RequestTimes:
    """Wall-clock (``time.time()``) milestones reported in ``RequestOutput.metrics``."""

    arrival_time: float = field(default_factory=time.time)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None

    def as_dict(self) -> dict[str, float]:
        return {k: v for k, v in vars(self).items() if v is not None}


class Request:
    """A sequence the scheduler runs.

    ``num_computed_tokens`` counts the tokens whose K/V are in the cache; the tokens still to
    compute are ``all_token_ids[num_computed_tokens:]``. A prompt prefill, a chunk of it, a decode
    and the recompute after preemption are all "compute the next tokens" to the scheduler.
    A request with ``n > 1`` runs as one sequence until its prompt is computed, then forks into
    ``n`` sequences that share the prompt's blocks (``index`` tells them apart).
    """

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        params: SamplingParams,
        generator: torch.Generator | None,
        times: RequestTimes,
        index: int = 0,
        cache_salt: str | None = None,
        priority: int = 0,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.generator = generator
        self.times = times
        self.index = index
        self.all_token_ids: list[int] = list(prompt_token_ids)
        self.output_token_ids: list[int] = []
        self.num_computed_tokens = 0
        self.num_cached_tokens = 0  # prompt tokens found in the prefix cache at first admission
        self.block_ids: list[int] = []
        # Leading blocks a sliding window has passed, given back (their ids now the null block)
        self.num_released_blocks = 0
        self.block_hashes: list[bytes] = []  # hashes of this sequence's full blocks, in order
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        self.num_preemptions = 0
        self.grammar: LLMatcher | None = None  # structured output: where its text stands
        self.thinking: ThinkingTracker | None = None  # its thinking_token_budget, if any
        # Mixed into the first block's hash: only requests with the same salt share its prefix.
        self.cache_salt = cache_salt
        self.priority = priority  # lower runs first under the priority scheduling policy
        self.arrival_index = 0  # the order in which the scheduler got it
        self.rope_offset = 0  # added to its positions to read the RoPE table (longrope)
        # An embedding request: how to pool, what is pooled so far, and whether every prompt
        # row counts (mean, CLS), so that no block may come from the prefix cache.
        self.pooling: PoolingParams | None = None
        self.pooled: torch.Tensor | None = None
        self.pools_every_row = False
        self.lora_id = 0  # the loaded LoRA adapter it runs with (see LoRAManager); 0: none
        # Speculative decoding: tokens proposed to follow it, checked in its next step
        self.spec_token_ids: list[int] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.finished

    @property
    def finish_reason(self) -> str | None:
        return self.status.value if self.status.finished else None

    def append_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
