"""Automatic prefix caching and block sharing (parallel sampling)."""

import random

import pytest

from pagedserve import LLM, SamplingParams
from pagedserve.engine.block_pool import BlockPool

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=3)


def _prompts(vocab_words: list[str]) -> list[list[int]]:
    """Token-id prompts sharing 0, 1, many blocks, and all of their tokens with the first."""
    rng = random.Random(0)
    base = [rng.randrange(100, 40000) for _ in range(90)]
    other = [rng.randrange(100, 40000) for _ in range(40)]
    return [
        base,
        other,  # shares nothing
        base[:16] + other,  # shares one block
        base[:80] + other[:7],  # shares five blocks
        list(base),  # shares all its tokens
        base[:64],  # a prefix of a cached prompt, exactly four blocks
    ]


def _run(llm: LLM, prompts: list[list[int]]):
    return [llm.generate([{"prompt_token_ids": p}], PARAMS, use_tqdm=False)[0] for p in prompts]


@pytest.fixture(scope="module")
def llms(smollm2_path):
    on = LLM(smollm2_path, kv_cache_memory=0.25)
    off = LLM(smollm2_path, kv_cache_memory=0.25, enable_prefix_caching=False)
    return on, off


def test_outputs_identical_with_and_without_caching(llms):
    on, off = llms
    prompts = _prompts([])
    with_cache, without = _run(on, prompts), _run(off, prompts)
    for a, b in zip(with_cache, without, strict=True):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs, strict=True):
            assert la.keys() == lb.keys()
            for tid in la:
                assert la[tid].logprob == pytest.approx(lb[tid].logprob, abs=1e-3)
    cached = [o.num_cached_tokens for o in with_cache]
    assert cached[0] == 0 and cached[1] == 0
    assert cached[2] == 16
    assert cached[3] == 80
    assert cached[4] == 80  # all 90 tokens are cached, but the last block is partial
    assert cached[5] == 48  # the last token of a fully cached prompt is recomputed
    assert all(o.num_cached_tokens == 0 for o in without)


def test_shared_long_prefix_computes_only_new_tokens(llms):
    llm = llms[0]
    engine = llm.llm_engine
    rng = random.Random(1)
    prefix = [rng.randrange(100, 40000) for _ in range(1000)]
    params = SamplingParams(temperature=0, max_tokens=4)
    llm.generate([{"prompt_token_ids": prefix + [11, 12, 13]}], params, use_tqdm=False)
    before = engine.get_stats()
    out = llm.generate(
        [{"prompt_token_ids": prefix + [21, 22, 23, 24, 25]}], params, use_tqdm=False
    )
    after = engine.get_stats()
    assert out[0].num_cached_tokens == 992  # 62 full blocks of 16
    assert after.prompt_tokens - before.prompt_tokens == 1005 - 992
    assert after.prefix_cache_hits - before.prefix_cache_hits == 992
    assert after.prefix_cache_queries - before.prefix_cache_queries == 1005


def test_cache_salt_separates_prefixes(llms):
    """Only prompts with the same cache_salt share cached blocks (vLLM's multi-tenant guard)."""
    llm = llms[0]
    rng = random.Random(2)
    prompt = [rng.randrange(100, 40000) for _ in range(70)]
    params = SamplingParams(temperature=0, max_tokens=4)

    def cached(**salt) -> int:
        out = llm.generate([{"prompt_token_ids": prompt, **salt}], params, use_tqdm=False)
        return out[0].num_cached_tokens

    assert cached(cache_salt="alice") == 0
    assert cached(cache_salt="alice") == 64
    assert cached(cache_salt="bob") == 0
    assert cached() == 0
    assert cached() == 64


def test_eviction_cycles_many_long_prompts(smollm2_path, smollm2_cache_gib):
    # 40 blocks (640 tokens) for 12 prompts of ~200 tokens sharing prefixes in random order:
    # cached blocks get evicted and re-made all the time; outputs must match a cache-less engine.
    kv = smollm2_cache_gib(40)
    on = LLM(smollm2_path, kv_cache_memory=kv)
    off = LLM(smollm2_path, kv_cache_memory=kv, enable_prefix_caching=False)
    rng = random.Random(2)
    stems = [[rng.randrange(100, 40000) for _ in range(150)] for _ in range(4)]
    prompts = [
        rng.choice(stems) + [rng.randrange(100, 40000) for _ in range(50)] for _ in range(12)
    ]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    batch = [{"prompt_token_ids": p} for p in prompts]
    a = on.generate(batch, params, use_tqdm=False)
    b = off.generate(batch, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in a] == [o.outputs[0].token_ids for o in b]
    pool = on.llm_engine.kv.pool
    assert pool.num_free_blocks == pool.num_blocks
    assert (pool.ref_counts == 0).all()
    assert sum(o.num_cached_tokens for o in a) > 0


def test_block_pool_never_hands_out_blocks_in_use():
    pool = BlockPool(8)
    held = pool.allocate(3)
    for i, b in enumerate(held):
        pool.cache(b, bytes([i]))
    pool.free(held[::-1])  # freed but cached: reusable until evicted, tail first
    pool.touch([pool.lookup(bytes([0]))])  # a prefix hit revives the first one
    fresh = pool.allocate(7)  # everything else, evicting the two cached blocks left
    assert held[0] not in fresh
    assert pool.lookup(bytes([0])) == held[0]
    assert pool.lookup(bytes([1])) is None and pool.lookup(bytes([2])) is None
    with pytest.raises(RuntimeError):
        pool.allocate(1)


def test_lru_eviction_order():
    pool = BlockPool(4)
    a, b = pool.allocate(2)
    pool.cache(a, b"a")
    pool.cache(b, b"b")
    pool.free([b])
    pool.free([a])
    pool.allocate(2)  # the two never-used blocks go first
    (evicted,) = pool.allocate(1)
    assert evicted == b  # freed first, evicted first
    assert pool.lookup(b"a") == a and pool.lookup(b"b") is None


def test_parallel_sampling_prefills_once(llms):
    llm = llms[0]
    engine = llm.llm_engine
    assert engine.reset_prefix_cache()
    rng = random.Random(3)
    prompt = [rng.randrange(100, 40000) for _ in range(37)]
    before = engine.get_stats()
    out = llm.generate(
        [{"prompt_token_ids": prompt}],
        SamplingParams(n=4, temperature=1.0, max_tokens=20, seed=7, ignore_eos=True),
        use_tqdm=False,
    )[0]
    after = engine.get_stats()
    assert after.prompt_tokens - before.prompt_tokens == len(prompt)
    assert [c.index for c in out.outputs] == [0, 1, 2, 3]
    assert len({tuple(c.token_ids) for c in out.outputs}) == 4
    assert all(len(c.token_ids) == 20 for c in out.outputs)
    stats = engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_no_leaks_after_abort_and_preemption_with_shared_blocks(smollm2_path, smollm2_cache_gib):
    llm = LLM(smollm2_path, kv_cache_memory=smollm2_cache_gib(24))
    engine = llm.llm_engine
    rng = random.Random(4)
    shared = [rng.randrange(100, 40000) for _ in range(64)]
    params = SamplingParams(temperature=0.7, max_tokens=40, ignore_eos=True, n=2, seed=1)
    for i in range(6):
        engine.add_request(f"r{i}", shared + [1000 + i], params)
    for _ in range(8):
        engine.step()
    engine.abort_request(["r1", "r4"])
    while engine.has_unfinished_requests():
        engine.step()
    stats = engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks
    assert (engine.kv.pool.ref_counts == 0).all()
