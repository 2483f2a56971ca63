"""Continuous batching: which sequences run this step, and how many tokens each."""

from __future__ import annotations

import bisect
import itertools
from collections import deque
from dataclasses import dataclass, field

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.request import Request, RequestStatus


@dataclass
class SchedulerOutput:
    """One step's plan: ``num_tokens[i]`` new tokens of ``requests[i]``, in batch order."""

    requests: list[Request]
    num_tokens: list[int]
    block_copies: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # Speculative drafts each request checks after its last token (in ``num_tokens``); None
    # when none does
    num_drafts: list[int] | None = None

    @property
    def is_empty(self) -> bool:
        return not self.requests


@dataclass
class SchedulerStats:
    num_preemptions: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hits: int = 0  # of which were found cached
    prompt_tokens: int = 0  # prompt tokens computed (not cached)


class Scheduler:
    """FCFS continuous batching with chunked prefill and preemption by recompute.

    Every step has a budget of ``max_num_batched_tokens``. Running sequences go first (one token
    each when decoding, the next chunk of their prompt when prefilling); then waiting sequences
    are admitted in arrival order while budget, the ``max_num_seqs`` cap and free blocks last
    (a prompt that would leave a tail of at most 1/16 of the budget runs whole instead).
    When a running sequence cannot get a block, the most recently admitted one is preempted:
    its blocks are freed and it goes back to the head of the queue to be recomputed.
    A decoding sequence with speculative drafts runs them after its last token, as many as the
    budget leaves room for, and none where their blocks are not free.

    ``policy="priority"`` (vLLM's ``--scheduling-policy priority``) orders the waiting queue by
    (``priority``, arrival), lower first, and preempts the running sequence that comes last in
    that order, even one already scheduled in this step (it then leaves the step).
    """

    POLICIES = ("fcfs", "priority")

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        policy: str = "fcfs",
        chunked_prefill: bool = True,
    ) -> None:
        if policy not in self.POLICIES:
            raise ValueError(f"scheduling policy must be one of {self.POLICIES}, got {policy!r}")
        self.policy = policy
        # Off for encoders, whose inputs must run whole (each token attends to all of them).
        self.chunked_prefill = chunked_prefill
        self._arrivals = itertools.count()
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self.stats = SchedulerStats()

    def add(self, request: Request) -> None:
        request.arrival_index = next(self._arrivals)
        self._enqueue(request, front=False)

    def _enqueue(self, request: Request, front: bool) -> None:
        """Into the waiting queue: at its place in priority order, else at the back (new) or
        the front (preempted)."""
        if self.policy == "priority":
            at = bisect.bisect_right(self.waiting, _order(request), key=_order)
            self.waiting.insert(at, request)
        elif front:
            self.waiting.appendleft(request)
        else:
            self.waiting.append(request)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        budget = self.max_num_batched_tokens
        scheduled: list[Request] = []
        num_tokens: list[int] = []
        preempted: list[Request] = []

        any_drafts = False
        i = 0
        while i < len(self.running) and budget > 0:
            req = self.running[i]
            remaining = req.num_tokens - req.num_computed_tokens
            if req.spec_token_ids:  # a decode that checks drafts: as many as budget and blocks let
                req.spec_token_ids = req.spec_token_ids[: budget - 1] if remaining == 1 else []
                if not self.kv.can_allocate(req, 1 + len(req.spec_token_ids), []):
                    req.spec_token_ids = []
                any_drafts = any_drafts or bool(req.spec_token_ids)
            n = self._chunk(remaining + len(req.spec_token_ids), budget)
            if n == 0:
                break
            while not self.kv.allocate(req, n):
                victim = self._victim()
                self.running.remove(victim)
                if victim in scheduled:  # priority policy: it leaves this step
                    j = scheduled.index(victim)
                    budget += num_tokens.pop(j)
                    del scheduled[j]
                    i -= 1
                    self.kv.drop_unwritten(victim)
                self._preempt(victim)
                preempted.append(victim)
                if victim is req:
                    break
            else:
                scheduled.append(req)
                num_tokens.append(n)
                budget -= n
                i += 1
                continue
            break

        while (
            self.waiting and budget > 0 and len(self.running) < self.max_num_seqs and not preempted
        ):
            req = self.waiting[0]
            hits = self.kv.find_cached_prefix(req)
            num_hit_tokens = len(hits) * self.kv.block_size
            n = self._chunk(req.num_tokens - num_hit_tokens, budget)
            if n == 0:
                break
            req.num_computed_tokens = num_hit_tokens
            if not self.kv.allocate(req, n, hits):
                req.num_computed_tokens = 0
                break
            self.waiting.popleft()
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit_tokens
                self.stats.prefix_cache_queries += req.num_tokens
                self.stats.prefix_cache_hits += num_hit_tokens
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled.append(req)
            num_tokens.append(n)
            budget -= n

        for req, n in zip(scheduled, num_tokens, strict=True):
            self.stats.prompt_tokens += max(
                0, min(req.num_prompt_tokens - req.num_computed_tokens, n)
            )
        drafts = [len(r.spec_token_ids) for r in scheduled] if any_drafts else None
        return SchedulerOutput(
            scheduled, num_tokens, self.kv.take_pending_copies(), preempted, drafts
        )

    def _chunk(self, remaining: int, budget: int) -> int:
        """Tokens to run for a request with ``remaining`` uncomputed tokens. A prompt that
        overshoots the budget by at most 1/16 of a step runs whole: a tail of a few tokens left
        to the next step would cost the request a whole step of time to first token. Without
        chunked prefill: all of it, or 0 (not this step) where it does not fit."""
        if not self.chunked_prefill:
            return remaining if remaining <= budget else 0
        if remaining - budget <= self.max_num_batched_tokens // 16:
            return remaining
        return min(remaining, budget)

    def _victim(self) -> Request:
        if self.policy == "priority":
            return max(self.running, key=_order)
        return self.running[-1]

    def _preempt(self, req: Request) -> None:
        self.kv.free(req)
        req.num_computed_tokens = 0
        req.spec_token_ids = []
        req.status = RequestStatus.PREEMPTED
        req.num_preemptions += 1
        self.stats.num_preemptions += 1
        self._enqueue(req, front=True)

    def finish(self, req: Request, status: RequestStatus) -> None:
        """Retire a sequence (stop, length or abort) and free its blocks at once."""
        req.status = status
        self.kv.free(req)
        if req in self.waiting:
            self.waiting.remove(req)
        else:
            self.running.remove(req)

    def fork(self, parent: Request, child: Request) -> None:
        """Run ``child`` beside ``parent``, sharing its blocks (parallel sampling)."""
        self.kv.fork(parent, child)
        child.num_computed_tokens = parent.num_computed_tokens
        child.arrival_index = parent.arrival_index
        child.status = RequestStatus.RUNNING
        self.running.insert(self.running.index(parent) + 1, child)


def _order(req: Request) -> tuple[int, int]:
    """Priority order: lower priority value first, then arrival."""
    return req.priority, req.arrival_index
