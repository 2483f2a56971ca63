"""Scheduler decisions that the engine-level tests do not pin down."""

from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.request import Request, RequestTimes
from pagedserve.engine.scheduler import Scheduler
from pagedserve.sampling_params import SamplingParams


def _request(name: str, prompt_len: int) -> Request:
    """A prompt of its own (no prefix shared with the other requests' prompts)."""
    first = 1000 * (ord(name) - ord("a"))
    return Request(
        name, list(range(first, first + prompt_len)), SamplingParams(), None, RequestTimes()
    )


def _scheduler(budget: int) -> Scheduler:
    return Scheduler(KVCacheManager(64, 16), 8, budget, 1024)


def test_prompt_just_over_the_budget_runs_whole():
    """A tail of at most 1/16 of the budget is not left for the next step: the request would
    wait a whole step for its first token over a few tokens."""
    sched = _scheduler(64)
    sched.add(_request("a", 64 + 4))
    out = sched.schedule()
    assert out.num_tokens == [68]


def test_longer_prompt_is_chunked_at_the_budget():
    sched = _scheduler(64)
    req = _request("a", 64 + 5)
    sched.add(req)
    assert sched.schedule().num_tokens == [64]
    req.num_computed_tokens += 64
    assert sched.schedule().num_tokens == [5]


def test_budget_left_by_earlier_requests_counts():
    """The 1/16 slack is measured against what is left of the step, after the requests before."""
    sched = _scheduler(64)
    sched.add(_request("a", 40))
    sched.add(_request("b", 26))  # 2 over what is left (24): runs whole
    sched.add(_request("c", 10))  # nothing left: waits
    out = sched.schedule()
    assert [r.request_id for r in out.requests] == ["a", "b"]
    assert out.num_tokens == [40, 26]
