"""Seeded random traffic through a small engine, step by step: requests arrive at random steps,
share random prefixes (prefix-cache hits), outgrow a tiny KV cache (preemption) and a tiny step
budget (chunked prefill), sample in parallel (n > 1), stop on tokens or text, and are aborted
while waiting, in the middle of a chunked prefill, after a preemption or after forking.

Two promises must hold under any such mix: each request that finishes gets exactly what it gets
alone on an engine with room to spare (with n-gram speculation too: what it gets alone
without speculation, sampled ones with a seed included), and no KV block leaks (after every step each block's
reference count is the number of live sequences holding it; at the end every block is free)."""

from __future__ import annotations

import random
import traceback
from collections import Counter
from collections.abc import Callable

import numpy as np
import pytest
from engine_traffic import PlannedRequest, make_traffic

from pagedserve import SamplingParams
from pagedserve.config import EngineConfig
from pagedserve.engine.llm_engine import LLMEngine
from pagedserve.outputs import RequestOutput

SEEDS = range(8)
NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 4,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}
# Engines too small for the traffic: 17 to 24 blocks of 4 tokens (a request may hold 16), steps
# of 6 to 24 tokens; the priority policy may preempt a request it already scheduled this step;
# speculative drafts are cut to the step's budget and the free blocks.
SETUPS = {
    "fcfs": dict(num_blocks=24, max_num_batched_tokens=16, max_num_seqs=6),
    "priority": dict(
        num_blocks=17, max_num_batched_tokens=24, max_num_seqs=8, scheduling_policy="priority"
    ),
    "ngram": dict(
        num_blocks=20, max_num_batched_tokens=6, max_num_seqs=6, speculative_config=NGRAM
    ),
}
BLOCK = 4
BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 4 * BLOCK  # K and V, 2 layers, 2 kv heads of 16, float32
MAX_MODEL_LEN = 64
MAX_ABORTS = 5  # per seed
# What each sequence of a request is compared on: its tokens, finish reason and stop reason
# exactly, and the logprobs of its tokens to LOGPROB_TOLERANCE. Sampled tokens of the tiny
# random model hardly depend on its logits: their logprobs show when a sequence attended to
# the wrong K/V.
Outcome = list[tuple[list[int], str | None, int | str | None, list[float]]]
LOGPROB_TOLERANCE = 1e-4


def _engine(path: str, num_blocks: int, **config) -> LLMEngine:
    engine = LLMEngine(
        EngineConfig(
            model=path,
            block_size=BLOCK,
            kv_cache_memory=num_blocks * BYTES_PER_BLOCK / 2**30,
            max_model_len=MAX_MODEL_LEN,
            **config,
        )
    )
    assert engine.num_blocks == num_blocks and engine.max_model_len == MAX_MODEL_LEN
    return engine


def _outcome(out: RequestOutput) -> Outcome:
    return [
        (
            list(c.token_ids),
            c.finish_reason,
            c.stop_reason,
            [lps[t].logprob for t, lps in zip(c.token_ids, c.logprobs, strict=True)],
        )
        for c in sorted(out.outputs, key=lambda c: c.index)
    ]


def _same(got: Outcome, expected: Outcome) -> bool:
    return [o[:3] for o in got] == [o[:3] for o in expected] and all(
        g[3] == pytest.approx(e[3], abs=LOGPROB_TOLERANCE)
        for g, e in zip(got, expected, strict=True)
    )


class Solo:
    """Each (prompt, params) run alone on a roomy engine, once."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.cache: dict[tuple, tuple[Outcome, str]] = {}

    def __call__(self, prompt: list[int], params: dict) -> tuple[Outcome, str]:
        """The outcome of every sequence, and the first one's text."""
        key = (tuple(prompt), tuple(sorted((k, str(v)) for k, v in params.items())))
        if key not in self.cache:
            request_id = f"solo-{len(self.cache)}"
            self.engine.add_request(request_id, prompt, SamplingParams(**params))
            last = None
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    last = out
            assert last is not None and last.finished
            self.cache[key] = (_outcome(last), last.outputs[0].text)
        return self.cache[key]


def _params(req: PlannedRequest, solo: Solo, rng: random.Random) -> dict:
    """The request's SamplingParams fields; a stop is picked from what it generates alone."""
    params: dict = {"max_tokens": req.max_tokens, "n": req.n, "ignore_eos": True, "logprobs": 0}
    if req.seed is None:
        params["temperature"] = 0.0
    else:
        params.update(temperature=0.8, seed=req.seed)
    if req.stop_from_output is not None and req.max_tokens > 2:
        outcome, text = solo(req.prompt, params)
        tokens = outcome[0][0]
        if req.stop_from_output == "token":
            params["stop_token_ids"] = [tokens[rng.randrange(1, len(tokens))]]
        elif len(text) > 3:
            at = rng.randrange(1, len(text) - 2)
            params["stop"] = [text[at : at + 2]]
    return params


def _check_blocks(engine: LLMEngine) -> None:
    """Every block's reference count is the number of live sequences holding it; free blocks
    are exactly those held by none; each prefix-cache entry points at its own block."""
    pool = engine.kv.pool
    held = np.zeros(pool.num_blocks, dtype=np.int64)
    for req in engine.scheduler.running:
        np.add.at(held, req.block_ids[req.num_released_blocks :], 1)
    for req in engine.scheduler.waiting:
        assert req.block_ids == [], f"waiting {req.request_id} holds blocks"
    assert (pool.ref_counts == held).all(), "block reference counts differ from their holders"
    assert set(pool.free_queue) == set(np.flatnonzero(held == 0).tolist())
    assert all(pool.block_hash[b] == h for h, b in pool.cached.items())


def _abort_candidates(engine: LLMEngine) -> dict[str, list[str]]:
    """Live request ids by the state an abort would catch them in."""
    kinds: dict[str, list[str]] = {"waiting": [], "preempted": [], "mid_prefill": [], "forked": []}
    for req in engine.scheduler.waiting:
        kinds["preempted" if req.num_preemptions else "waiting"].append(req.request_id)
    for req in engine.scheduler.running:
        if 0 < req.num_computed_tokens < req.num_prompt_tokens:
            kinds["mid_prefill"].append(req.request_id)
    kinds["forked"] = [rid for rid, g in engine.groups.items() if len(g.sequences) > 1]
    return kinds


def run_chaos(engine: LLMEngine, planned: list[PlannedRequest], rng: random.Random, solo: Solo):
    """Drive the traffic step by step; returns (finished outputs, aborted ids, what was hit)."""
    pending = list(planned)
    finals: dict[str, RequestOutput] = {}
    aborted: set[str] = set()
    hit: Counter = Counter()
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0].arrival_step <= step:
            req = pending.pop(0)
            req.params = _params(req, solo, rng)
            priority = req.priority if engine.scheduler.policy == "priority" else 0
            engine.add_request(
                req.request_id, req.prompt, SamplingParams(**req.params), priority=priority
            )
        for kind, ids in _abort_candidates(engine).items():
            if ids and len(aborted) < MAX_ABORTS and rng.random() < 0.1:
                victim = rng.choice(ids)
                engine.abort_request(victim)
                aborted.add(victim)
                hit[f"abort_{kind}"] += 1
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        _check_blocks(engine)
        step += 1
        assert step < 3000, "the traffic never drained"
    stats = engine.get_stats()
    hit["preemptions"] += stats.num_preemptions
    hit["prefix_hits"] += stats.prefix_cache_hits
    hit["accepted_drafts"] += stats.spec_decode_num_accepted_tokens
    return finals, aborted, hit


def _problems(seed: int, engine: LLMEngine, solo: Solo) -> tuple[list[str], Counter]:
    rng = random.Random(seed)
    planned = make_traffic(seed)
    finals, aborted, hit = run_chaos(engine, planned, rng, solo)
    problems = []
    for req in planned:
        if req.request_id in aborted:
            continue
        if req.request_id not in finals:
            problems.append(f"{req.request_id}: never finished")
            continue
        out = finals[req.request_id]
        hit["stopped"] += sum(c.finish_reason == "stop" for c in out.outputs)
        hit["parallel"] += req.n > 1
        expected, _ = solo(req.prompt, req.params)
        got = _outcome(out)
        if not _same(got, expected):
            problems.append(
                f"{req.request_id} {req.params} prompt {len(req.prompt)}: {got} != {expected}"
            )
    assert not engine.has_unfinished_requests()
    assert not engine.scheduler.running and not engine.scheduler.waiting
    assert engine.kv.pool.num_free_blocks == engine.num_blocks
    assert not engine.kv.pool.ref_counts.any()
    return problems, hit


@pytest.fixture(scope="module")
def chaos(tiny_model_dir) -> Callable[[str, int], tuple[list[str], Counter]]:
    """``chaos(setup, seed)`` -> (what went wrong in that seed's traffic on a fresh engine of
    that setup, what it hit)."""
    path = tiny_model_dir("llama")
    solo = Solo(_engine(path, 64, max_num_seqs=4))
    runs: dict[tuple[str, int], tuple[list[str], Counter]] = {}

    def run(setup: str, seed: int) -> tuple[list[str], Counter]:
        if (setup, seed) not in runs:
            config = SETUPS[setup]
            engine = _engine(path, **config)
            try:
                runs[setup, seed] = _problems(seed, engine, solo)
            except AssertionError:
                runs[setup, seed] = ([traceback.format_exc()], Counter())
        return runs[setup, seed]

    return run


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_random_traffic_keeps_outputs_and_frees_every_block(chaos, setup, seed):
    problems, _ = chaos(setup, seed)
    assert problems == []


def test_the_traffic_hits_every_feature(chaos):
    """The seeds together abort in each state, preempt, hit the prefix cache, fork, stop and
    accept speculative drafts."""
    total = sum((chaos(setup, seed)[1] for setup in SETUPS for seed in SEEDS), Counter())
    for what in (
        "abort_waiting",
        "abort_preempted",
        "abort_mid_prefill",
        "abort_forked",
        "preemptions",
        "prefix_hits",
        "stopped",
        "parallel",
        "accepted_drafts",
    ):
        assert total[what] > 0, (what, total)
