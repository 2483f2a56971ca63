"""Blocks that a sliding window has passed go back to the pool, on models whose every layer has
that window (Mistral v0.1); the tiny ``mistral`` model's window is 8 positions."""

from __future__ import annotations

import pytest
import torch
from tiny_models import tiny_hf_model

from pagedserve import LLM, SamplingParams
from pagedserve.engine import llm_engine
from pagedserve.engine.request import Request
from pagedserve.model.loader import load_model
from pagedserve.worker.kv_cache import shared_sliding_window

BLOCK = 4
BYTES_PER_BLOCK = 2 * 2 * 2 * 16 * 4 * BLOCK  # K and V, 2 layers, 2 kv heads of 16, float32
GREEDY = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True, logprobs=2)


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (70, 9, 33)]


def _llm(path: str, num_blocks: int, **kwargs) -> LLM:
    """An engine with ``num_blocks`` blocks of 4 tokens and steps of at most 16 tokens, so that
    prompts run in chunks that each give back blocks."""
    return LLM(
        path,
        block_size=BLOCK,
        kv_cache_memory=num_blocks * BYTES_PER_BLOCK / 2**30,
        max_num_batched_tokens=16,
        **kwargs,
    )


def _generate(llm: LLM, prompts: list[list[int]], params: SamplingParams = GREEDY):
    return llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)


@pytest.fixture(scope="module")
def mistral(tiny_model_dir) -> str:
    return tiny_model_dir("mistral")


@pytest.fixture(scope="module")
def keeping_every_block(mistral) -> list:
    """The outputs of an engine that gives nothing back, for comparison."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(llm_engine, "shared_sliding_window", lambda model: None)
        llm = _llm(mistral, 400)
        assert llm.llm_engine.kv.sliding_window is None
        return _generate(llm, _prompts())


def test_only_a_window_on_every_layer_counts(tiny_model_dir):
    windows = {}
    for kind in ("mistral", "phi3", "llama", "qwen2_window", "gemma2", "gemma3"):
        model = load_model(tiny_model_dir(kind), torch.float32, torch.device("cpu"))
        windows[kind] = shared_sliding_window(model)
    assert windows == {
        "mistral": 8,
        "phi3": 8,
        "llama": None,
        "qwen2_window": None,
        "gemma2": None,
        "gemma3": None,
    }


def test_the_context_is_cut_to_the_cache_only_without_a_window(tiny_model_dir, mistral):
    """A cache of 25 blocks (100 tokens) holds a window of 8 and a step of 16, but not a whole
    context of 256."""
    assert _llm(tiny_model_dir("llama"), 25).llm_engine.max_model_len == 25 * BLOCK
    assert _llm(mistral, 25).llm_engine.max_model_len == 256
    assert _llm(mistral, 8).llm_engine.max_model_len == 7 * BLOCK  # 7 + the null block


def test_outputs_match_an_engine_that_keeps_every_block(mistral, keeping_every_block):
    llm = _llm(mistral, 400)
    assert llm.llm_engine.kv.sliding_window == 8
    outputs = _generate(llm, _prompts())
    for ours, theirs in zip(outputs, keeping_every_block, strict=True):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
        for a, b in zip(ours.outputs[0].logprobs, theirs.outputs[0].logprobs, strict=True):
            assert a.keys() == b.keys()
            for token in a:
                assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-5)


def test_greedy_answer_is_transformers(mistral):
    prompt = _prompts()[0]
    hf = tiny_hf_model("mistral")
    with torch.inference_mode():
        expected = hf.generate(
            torch.tensor([prompt]), max_new_tokens=40, do_sample=False, min_new_tokens=40
        )[0, len(prompt) :].tolist()
    out = _generate(_llm(mistral, 400), [prompt], SamplingParams(temperature=0, max_tokens=40))
    assert out[0].outputs[0].token_ids == expected


def test_a_request_holds_about_a_window_of_blocks(mistral):
    """Each step's requests hold at most the window's blocks and the step's, however long they
    grow: 190 tokens each run in a cache of 24 blocks (96 tokens) without preemption, and every
    block is free at the end."""
    llm = _llm(mistral, 25)  # one of them is the null block
    engine = llm.llm_engine
    assert engine.max_model_len == 256  # not lowered to what the cache holds
    params = SamplingParams(temperature=0, max_tokens=120, ignore_eos=True)
    for i, prompt in enumerate(_prompts()[:2]):
        engine.add_request(str(i), prompt, params)
    most = 0
    while engine.has_unfinished_requests():
        engine.step()
        for request in engine.scheduler.running:
            live = request.block_ids[request.num_released_blocks :]
            assert engine.kv.null_block not in live
            assert set(request.block_ids[: request.num_released_blocks]) <= {engine.kv.null_block}
            most = max(most, len(live))
    assert most <= (8 + 16) // BLOCK + 2
    assert engine.get_stats().num_preemptions == 0
    assert engine.kv.pool.num_free_blocks == engine.num_blocks == 24


def test_given_back_blocks_stay_in_the_prefix_cache(mistral):
    llm = _llm(mistral, 400)
    prompt = _prompts()[0]
    first = _generate(llm, [prompt])[0]
    again = _generate(llm, [prompt])[0]
    assert again.num_cached_tokens == 68  # 17 full blocks of the 70-token prompt
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_parallel_samples_share_and_free_blocks(mistral, keeping_every_block):
    llm = _llm(mistral, 400)
    engine = llm.llm_engine
    params = SamplingParams(n=3, temperature=0, max_tokens=60, ignore_eos=True)
    out = _generate(llm, [_prompts()[0]], params)[0]
    expected = keeping_every_block[0].outputs[0].token_ids[:60]
    assert [o.token_ids for o in out.outputs] == [expected] * 3
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def test_a_cached_prefix_that_fills_the_pool_is_admitted(mistral):
    """A 97-token prompt whose first 96 tokens are cached in all 24 blocks of the pool: the hits
    the window has passed go back at once, so it runs (it waited forever with the pool free), and
    answers as an engine without the prefix cache does."""
    prompt = torch.randint(3, 49152, (96,), generator=torch.Generator().manual_seed(5)).tolist()
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    llm = _llm(mistral, 25)
    engine = llm.llm_engine
    _generate(llm, [prompt], SamplingParams(temperature=0, max_tokens=1))
    engine.add_request("again", [*prompt, 5], params)
    outputs = []
    for _ in range(100):
        if not engine.has_unfinished_requests():
            break
        outputs += [out for out in engine.step() if out.finished]
    (out,) = outputs
    assert out.num_cached_tokens == 96
    expected = _generate(_llm(mistral, 25, enable_prefix_caching=False), [[*prompt, 5]], params)
    assert out.outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def test_without_chunked_prefill_decodes_give_back(mistral, keeping_every_block):
    """A prompt that runs whole needs all its blocks in that step; its decodes then give back
    what the window has passed."""
    llm = _llm(mistral, 400, enable_chunked_prefill=False)
    engine = llm.llm_engine
    assert engine.kv.sliding_window == 8
    outputs = _generate(llm, _prompts())
    for ours, theirs in zip(outputs, keeping_every_block, strict=True):
        assert ours.outputs[0].token_ids == theirs.outputs[0].token_ids
    prompt = _prompts()[0][::-1]  # not in the prefix cache
    engine.add_request("long", prompt, SamplingParams(max_tokens=40, ignore_eos=True))
    held = []
    while engine.has_unfinished_requests():
        engine.step()
        held += [len(r.block_ids) - r.num_released_blocks for r in engine.scheduler.running]
    assert held[0] == -(-len(prompt) // BLOCK)  # the whole prompt's
    assert max(held[1:]) <= (8 + 1) // BLOCK + 2
    assert engine.kv.pool.num_free_blocks == engine.num_blocks


def test_a_prefix_hits_while_its_window_is_cached(mistral):
    """Only the blocks the window of the next token reads need be cached, as in vLLM: a prompt
    whose first blocks were evicted (given back first, so handed out first) still hits."""
    generator = torch.Generator().manual_seed(7)
    prompt, other = (torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (60, 40))
    greedy = SamplingParams(temperature=0, max_tokens=1)
    llm = _llm(mistral, 25)
    pool = llm.llm_engine.kv.pool
    _generate(llm, [prompt], greedy)
    _generate(llm, [other], greedy)  # the pool's unused blocks, then some of the prompt's first
    probe = Request("probe", prompt + [5], greedy, None, None)  # type: ignore[arg-type]
    hits = llm.llm_engine.kv.find_cached_prefix(probe)
    assert len(hits) == 15 and hits[0] == llm.llm_engine.kv.null_block
    assert None in [pool.lookup(h) for h in probe.block_hashes]  # one of its first blocks is gone
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    again = _generate(llm, [prompt + [5]], params)[0]
    assert again.num_cached_tokens == 60
    expected = _generate(_llm(mistral, 25, enable_prefix_caching=False), [prompt + [5]], params)
    assert again.outputs[0].token_ids == expected[0].outputs[0].token_ids
    assert pool.num_free_blocks == pool.num_blocks
