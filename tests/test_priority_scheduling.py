"""vLLM's priority scheduling (``--scheduling-policy priority``): waiting requests run in order of
(priority, arrival), lower first, and when the KV cache runs out the running request last in
that order is preempted, whichever was admitted last."""

from __future__ import annotations

import pytest
from server_utils import MODEL_NAME, ServerProcess, request

from pagedserve import LLM, SamplingParams
from pagedserve.engine.kv_cache_manager import KVCacheManager
from pagedserve.engine.request import Request, RequestTimes
from pagedserve.engine.scheduler import Scheduler


def _request(name: str, prompt_len: int, priority: int = 0) -> Request:
    first = 1000 * (ord(name) - ord("a"))
    prompt = list(range(first, first + prompt_len))
    return Request(name, prompt, SamplingParams(), None, RequestTimes(), priority=priority)


def _scheduler(policy: str, num_blocks: int = 64) -> Scheduler:
    return Scheduler(KVCacheManager(num_blocks, 16), 8, 256, 1024, policy)


def _run(sched: Scheduler) -> list[str]:
    """One step, as the engine would take it: the scheduled tokens are computed and each
    request whose prompt is done gets one more token. Returns the scheduled ids."""
    out = sched.schedule()
    for req, n in zip(out.requests, out.num_tokens, strict=True):
        req.num_computed_tokens += n
        if req.num_computed_tokens == req.num_tokens:
            req.all_token_ids.append(7)
            req.output_token_ids.append(7)
    return [r.request_id for r in out.requests]


def test_waiting_requests_run_by_priority_then_arrival():
    sched = _scheduler("priority")
    for name, priority in [("a", 0), ("b", -1), ("c", 1), ("d", 0)]:
        sched.add(_request(name, 10, priority))
    assert _run(sched) == ["b", "a", "d", "c"]

    fcfs = _scheduler("fcfs")
    for name in "abcd":
        fcfs.add(_request(name, 10))
    assert _run(fcfs) == ["a", "b", "c", "d"]


@pytest.mark.parametrize(("policy", "victim"), [("fcfs", "b"), ("priority", "a")])
def test_the_victim_when_blocks_run_out(policy, victim):
    """Four blocks: ``a`` (priority 5) holds two, ``b`` (priority 0, arrived later) the other
    two, full. When ``b`` needs a fifth block, first-come-first-served preempts the last admitted
    (``b`` itself); the priority policy preempts ``a``, already scheduled in this step, which
    then leaves it."""
    sched = _scheduler(policy, num_blocks=4)
    a, b = _request("a", 20, priority=5), _request("b", 32)
    sched.add(a)
    assert _run(sched) == ["a"]
    sched.add(b)
    assert _run(sched) == ["a", "b"]  # b's prompt fills its two blocks
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == [victim]
    survivor = {"a": "b", "b": "a"}[victim]
    assert [r.request_id for r in out.requests] == [survivor]
    assert out.num_tokens == [1]
    assert sched.waiting[0].request_id == victim


def test_a_victim_taken_out_of_the_step_leaves_no_unwritten_block_in_the_cache():
    """``a`` (priority 5) is scheduled first: its decode fills its second block, which the
    prefix cache takes at once, and its drafts take a third. Then ``b`` needs a block, and the
    priority policy preempts ``a`` out of the step; ``b`` takes ``a``'s last block. The second
    block's K/V is never written: it must not stay findable."""
    sched = _scheduler("priority", num_blocks=5)
    a, b = _request("a", 30, priority=5), _request("b", 32)
    sched.add(a)
    assert _run(sched) == ["a"]
    sched.add(b)
    assert _run(sched) == ["a", "b"]  # a: 31 of its 32 tokens computed; b: two full blocks
    a.spec_token_ids = [1, 2, 3]  # ngram drafts to check
    out = sched.schedule()
    assert [r.request_id for r in out.preempted] == ["a"]
    first, second = a.block_hashes[:2]
    assert sched.kv.pool.lookup(first) is not None  # computed two steps ago: still shareable
    assert sched.kv.pool.lookup(second) is None


def test_engine_serves_by_priority(tiny_model_dir):
    """One sequence at a time: the requests finish in priority order, and each generation is
    the one first-come-first-served gives."""
    prompts = [{"prompt_token_ids": [5 + i, 900, 17, 4000]} for i in range(3)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = LLM(
        tiny_model_dir("llama"),
        device="cpu",
        kv_cache_memory=0.02,
        max_num_seqs=1,
        scheduling_policy="priority",
    )
    outputs = llm.generate(prompts, params, use_tqdm=False, priority=[2, 0, 1])
    finished = sorted(range(3), key=lambda i: outputs[i].metrics["finished_time"])
    assert finished == [1, 2, 0]

    fcfs = LLM(tiny_model_dir("llama"), device="cpu", kv_cache_memory=0.02)
    expected = fcfs.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == [o.outputs[0].token_ids for o in expected]
    with pytest.raises(ValueError, match="needs the priority scheduling policy"):
        fcfs.generate(prompts[:1], params, use_tqdm=False, priority=[1])


def test_server_takes_priority_only_with_the_policy(tiny_model_dir):
    args = [tiny_model_dir("llama"), "--served-model-name", MODEL_NAME, "--kv-cache-memory", "0.02"]
    server = ServerProcess([*args, "--scheduling-policy", "priority"]).wait_ready()
    try:
        body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 3, "priority": -5}
        status, response = request(server.url + "/v1/completions", "POST", body)
        assert status == 200, response
        assert response["usage"]["completion_tokens"] == 3
    finally:
        server.close()
