"""A request's greedy output does not depend on what else the engine is doing."""

import pytest

from pagedserve import LLM, SamplingParams

PROMPTS = [
    "The capital of France is",
    "Write a haiku about the sea.",
    "def fibonacci(n):",
    "List three colours:",
    "Once upon a time, in a small village,",
    "The square root of 144 is",
    "Translate to French: good morning",
    "Q: What is the boiling point of water?\nA:",
]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def _mixed_batch() -> tuple[list[str], list[SamplingParams]]:
    """32 requests: the probe prompts greedy, plus sampled, penalised and long ones around them."""
    prompts, params = [], []
    for i in range(32):
        if i % 4 == 0:
            prompts.append(PROMPTS[(i // 4) % len(PROMPTS)])
            params.append(GREEDY)
        else:
            prompts.append(PROMPTS[i % len(PROMPTS)] + " " + PROMPTS[(i * 3) % len(PROMPTS)])
            params.append(
                SamplingParams(
                    temperature=0.8, top_p=0.9, max_tokens=8 + i % 16, seed=i, presence_penalty=0.5
                )
            )
    return prompts, params


@pytest.fixture(scope="module")
def alone(smollm2_path):
    llm = LLM(smollm2_path)
    outs = {p: llm.generate([p], GREEDY, use_tqdm=False)[0].outputs[0].token_ids for p in PROMPTS}
    return llm, outs


def _check(llm, alone_outs):
    prompts, params = _mixed_batch()
    results = llm.generate(prompts, params, use_tqdm=False)
    for prompt, p, out in zip(prompts, params, results, strict=True):
        if p is GREEDY:
            assert out.outputs[0].token_ids == alone_outs[prompt], prompt
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
    return stats


def test_batch_of_32(alone):
    llm, outs = alone
    _check(llm, outs)


def test_preemption(smollm2_path, smollm2_cache_gib, alone):
    # 16 blocks of 16 tokens cannot hold 32 requests at once: running ones get preempted.
    llm = LLM(smollm2_path, kv_cache_memory=smollm2_cache_gib(16), enable_prefix_caching=False)
    assert llm.llm_engine.num_blocks == 16
    stats = _check(llm, alone[1])
    assert stats.num_preemptions > 0


def test_chunked_prefill(smollm2_path, alone):
    llm = LLM(smollm2_path, max_num_batched_tokens=48, enable_prefix_caching=False)
    _check(llm, alone[1])


def test_prefix_cache_on_and_off(smollm2_path, alone):
    llm = LLM(smollm2_path, enable_prefix_caching=False)
    _check(llm, alone[1])
