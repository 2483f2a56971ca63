"""Speculative decoding by prompt lookup (``speculative_config={"method": "ngram", ...}``): the
proposer, the config, and engines whose output with drafts is the output without them."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from server_utils import MODEL_NAME, ServerProcess, metrics, wait_until_idle

from pagedserve import LLM, SamplingParams
from pagedserve.engine.request import Request, RequestTimes
from pagedserve.sample.sampler import Sampler, SamplingRow
from pagedserve.sampling_params import StructuredOutputsParams
from pagedserve.spec_decode.config import SpeculativeConfig
from pagedserve.spec_decode.ngram import NgramSpeculator, find_continuation

NGRAM = {
    "method": "ngram",
    "num_speculative_tokens": 3,
    "prompt_lookup_max": 3,
    "prompt_lookup_min": 1,
}
# Prompts that repeat themselves, so that lookups find them (and a random model's greedy loops
# soon repeat too).
PROMPTS = [
    "one two three four five six, one two three four five six, one two three",
    "The cat sat on the mat. The cat sat on the mat. The cat",
    {"prompt_token_ids": [7, 8, 9, 10, 7, 8, 9, 10, 7, 8]},
    "No repeats in this one at all.",
]


def test_find_continuation():
    tokens = np.array([1, 2, 3, 4, 9, 2, 3, 5, 6, 7, 2, 3])
    # "2 3" ends at 2 and at 6; the later one has 4 tokens after it.
    assert find_continuation(tokens, 1, 3, 4).tolist() == [5, 6, 7, 2]
    # A longer suffix wins over a later, shorter one: "3 4 1 2" recurs, "1 2" is its end.
    tokens = np.array([3, 4, 1, 2, 8, 8, 1, 2, 7, 3, 4, 1, 2])
    assert find_continuation(tokens, 2, 4, 2).tolist() == [8, 8]
    assert find_continuation(tokens, 2, 2, 2).tolist() == [7, 3]
    # No occurrence with k tokens after it: the earliest, which has the most.
    loop = np.array([5, 6, 5, 6, 5, 6])
    assert find_continuation(loop, 2, 2, 3).tolist() == [5, 6, 5]
    assert find_continuation(loop, 2, 2, 10).tolist() == [5, 6, 5, 6]
    assert find_continuation(np.array([1, 2, 3, 4]), 1, 3, 3).tolist() == []
    assert find_continuation(np.array([1, 2, 1]), 2, 3, 3).tolist() == []  # shorter than min
    assert find_continuation(np.array([4]), 1, 3, 3).tolist() == []


def test_config():
    assert SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 4}) == (
        SpeculativeConfig(4, 5, 5)
    )
    assert SpeculativeConfig.parse({"num_speculative_tokens": 2, "prompt_lookup_max": 3}) == (
        SpeculativeConfig(2, 3, 3)
    )
    assert SpeculativeConfig.parse(NGRAM) == SpeculativeConfig(3, 3, 1)
    for bad, message in (
        ({"method": "eagle", "num_speculative_tokens": 2}, "only 'ngram'"),
        ({"method": "ngram"}, "num_speculative_tokens"),
        ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
        ({**NGRAM, "prompt_lookup_min": 4}, "exceeds"),
        ({**NGRAM, "model": "x"}, "unknown keys"),
        ({**NGRAM, "disable_by_batch_size": 0}, "disable_by_batch_size"),
    ):
        with pytest.raises(ValueError, match=message):
            SpeculativeConfig.parse(bad)


def test_acceptance_keeps_the_sampling_law():
    """A draft is kept when the token sampled at its position equals it, so every emitted token
    has the model's distribution there: here over a vocabulary of 4, with a fixed draft."""
    probs = torch.tensor([[0.1, 0.5, 0.3, 0.1], [0.25, 0.25, 0.4, 0.1]])
    sampler = Sampler(vocab_size=4, eos_token_ids=set())
    speculator = NgramSpeculator(SpeculativeConfig(1, 1, 1), max_model_len=100)
    params = SamplingParams(temperature=1.0)
    first, second = np.zeros(4), np.zeros(4)
    trials = 4000
    for _ in range(trials // 100):
        rows, reqs = [], []
        for _ in range(100):
            req = _Stub(draft=2)
            reqs.append(req)
            rows += [SamplingRow(params, [0], []), SamplingRow(params, [0], [2])]
        tokens = sampler(probs.log().repeat(100, 1), rows).token_ids
        for i, req in enumerate(reqs):
            sampled = tokens[2 * i : 2 * i + 2]
            kept = speculator.accept(req, sampled)
            first[sampled[0]] += 1
            if kept:
                second[sampled[1]] += 1
    np.testing.assert_allclose(first / trials, probs[0], atol=0.03)
    np.testing.assert_allclose(first[2] / trials, second.sum() / trials, atol=1e-9)
    np.testing.assert_allclose(second / second.sum(), probs[1], atol=0.05)
    assert speculator.stats()["spec_decode_num_draft_tokens"] == trials


def test_a_sequence_whose_drafts_fail_waits_longer_each_time():
    speculator = NgramSpeculator(SpeculativeConfig(3, 3, 1), max_model_len=100)
    req = Request(
        "r", [1, 2, 3, 1, 2, 3, 1, 2], SamplingParams(max_tokens=50), None, RequestTimes()
    )

    def proposals(steps: int) -> list[list[int]]:
        found = []
        for _ in range(steps):
            speculator.propose([req], num_running=1)
            found.append(req.spec_token_ids)
        return found

    assert proposals(1) == [[3, 1, 2]]
    speculator.accept(req, [9, 9, 9, 9])  # all fail: wait one step
    assert proposals(2) == [[], [3, 1, 2]]
    speculator.accept(req, [9, 9, 9, 9])  # again: two steps
    assert proposals(3) == [[], [], [3, 1, 2]]
    speculator.accept(req, [3, 9, 9, 9])  # one stands: no more waiting
    assert proposals(1) == [[3, 1, 2]]


class _Stub:
    """What ``NgramSpeculator.accept`` reads and writes of a request."""

    def __init__(self, draft: int) -> None:
        self.spec_token_ids = [draft]
        self.num_computed_tokens = 10


def generate(llm: LLM, params: SamplingParams, prompts=PROMPTS) -> list[tuple]:
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks and stats.num_running == 0
    return [
        (
            c.token_ids,
            c.text,
            c.finish_reason,
            [entry[t].logprob for entry, t in zip(c.logprobs, c.token_ids, strict=True)]
            if c.logprobs is not None
            else None,
        )
        for o in outputs
        for c in o.outputs
    ]


def assert_same(got: list[tuple], want: list[tuple]) -> None:
    for (ids, text, reason, logprobs), (ref_ids, ref_text, ref_reason, ref_logprobs) in zip(
        got, want, strict=True
    ):
        assert (ids, text, reason) == (ref_ids, ref_text, ref_reason)
        if ref_logprobs is not None:
            assert logprobs == pytest.approx(ref_logprobs, abs=1e-4)


@pytest.mark.parametrize("enforce_eager", [False, True])
def test_greedy_output_is_unchanged(tiny_model_dir, enforce_eager):
    """Drafts checked through the decode stack (or module by module), with logprobs, penalties,
    min_tokens and stop strings: the same tokens, text and logprobs as without speculation."""
    path = tiny_model_dir("llama")
    params = [
        SamplingParams(temperature=0, max_tokens=40, logprobs=2, ignore_eos=True),
        SamplingParams(
            temperature=0, max_tokens=30, repetition_penalty=1.2, presence_penalty=0.5,
            min_tokens=5, stop=[" sat"],
        ),
    ]  # fmt: skip
    plain = LLM(path, dtype="float32", enforce_eager=enforce_eager)
    llm = LLM(path, dtype="float32", enforce_eager=enforce_eager, speculative_config=NGRAM)
    for p in params:
        assert_same(generate(llm, p), generate(plain, p))
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens > 0
    assert stats.spec_decode_num_draft_tokens > stats.spec_decode_num_accepted_tokens
    assert stats.generation_tokens == plain.llm_engine.get_stats().generation_tokens


def test_drafts_beside_prefills_and_preemption(tiny_model_dir):
    """Steps that mix draft checks with prompt chunks, a KV cache small enough to preempt, and
    n > 1: the same output as without speculation, and every block back."""
    path = tiny_model_dir("llama")
    prompts = PROMPTS * 3
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    small = {
        "dtype": "float32",
        "max_num_batched_tokens": 24,
        "kv_cache_memory": 12 * 16 * 1024 / 2**30,  # 24 blocks of 16 tokens
    }
    plain = LLM(path, **small)
    llm = LLM(path, **small, speculative_config=NGRAM)
    assert_same(generate(llm, params, prompts), generate(plain, params, prompts))
    assert llm.llm_engine.get_stats().num_preemptions > 0
    assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0
    n2 = SamplingParams(n=2, temperature=0, max_tokens=20, ignore_eos=True)
    assert_same(generate(llm, n2), generate(plain, n2))


def test_structured_output_beside_drafts(tiny_model_dir):
    """A grammar-constrained request gets no drafts; it runs in steps with others' draft checks
    and answers as without speculation."""
    path = tiny_model_dir("llama")
    constrained = SamplingParams(
        temperature=0,
        max_tokens=20,
        structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-[a-z]{4}"),
    )
    free = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    params = [free, constrained, free]
    plain = LLM(path, dtype="float32")
    llm = LLM(path, dtype="float32", speculative_config=NGRAM)
    want = [o.outputs[0].text for o in plain.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]
    assert got == want
    assert re.fullmatch(r"[0-9]{3}-[a-z]{4}", got[1])
    assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0


def test_seeded_sampling_reproduces_and_max_tokens_holds(tiny_model_dir):
    llm = LLM(tiny_model_dir("llama"), dtype="float32", speculative_config=NGRAM)
    params = SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=17, ignore_eos=True)
    first = generate(llm, params)
    assert first == generate(llm, params)
    assert all(len(ids) == 17 and reason == "length" for ids, _, reason, _ in first)


def test_a_seed_gives_the_answer_it_gives_without_drafts(tiny_model_dir):
    """Checking drafts draws once per position checked, and how many a step checks depends on
    its budget; the generator is put back to draw for the emitted tokens only, so a seeded
    sampled answer is the same with speculation or without, at any budget, beside others."""
    path = tiny_model_dir("llama")
    params = [
        SamplingParams(
            temperature=0.8, seed=seed, max_tokens=24, ignore_eos=True,
            allowed_token_ids=[500, 600, 700],
        )
        for seed in (1, 2, 3)
    ]  # fmt: skip
    prompts = [{"prompt_token_ids": [500, 600, 700] * 5}] * 3

    def answers(**options) -> list[list[int]]:
        llm = LLM(path, dtype="float32", **options)
        out = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
        if "speculative_config" in options:
            assert llm.llm_engine.get_stats().spec_decode_num_accepted_tokens > 0
        return out

    want = answers()
    assert len({tuple(a) for a in want}) == 3
    assert answers(speculative_config=NGRAM) == want
    assert answers(speculative_config=NGRAM, max_num_batched_tokens=2) == want


def test_disable_by_batch_size(tiny_model_dir):
    """No drafts while more sequences run than ``disable_by_batch_size``."""
    config = {**NGRAM, "disable_by_batch_size": 1}
    llm = LLM(tiny_model_dir("llama"), dtype="float32", speculative_config=config)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    llm.generate(PROMPTS, params, use_tqdm=False)
    assert llm.llm_engine.get_stats().spec_decode_num_drafts == 0
    llm.generate(PROMPTS[0], params, use_tqdm=False)
    assert llm.llm_engine.get_stats().spec_decode_num_drafts > 0


def test_the_packaged_model_copies_with_drafts(smollm2_path):
    """A real model asked to repeat a text accepts most drafts, and says the same."""
    text = (
        "PagedAttention keeps the KV cache in fixed-size blocks, so that sequences of any "
        "length share one pool of memory without fragmentation."
    )
    chat = [{"role": "user", "content": f"Repeat this sentence exactly: {text}"}]
    params = SamplingParams(temperature=0, max_tokens=60)
    plain = LLM(smollm2_path, dtype="float32", kv_cache_memory=0.25)
    llm = LLM(smollm2_path, dtype="float32", kv_cache_memory=0.25, speculative_config=NGRAM)
    want = plain.chat(chat, params, use_tqdm=False)[0].outputs[0]
    got = llm.chat(chat, params, use_tqdm=False)[0].outputs[0]
    assert (got.token_ids, got.text) == (want.token_ids, want.text)
    assert "fixed-size blocks" in got.text
    stats = llm.llm_engine.get_stats()
    assert stats.spec_decode_num_accepted_tokens >= stats.spec_decode_num_draft_tokens / 2


def test_refusals(tiny_model_dir):
    with pytest.raises(ValueError, match="only 'ngram'"):
        LLM(tiny_model_dir("llama"), speculative_config={"method": "eagle"})
    with pytest.raises(ValueError, match="pooling model"):
        LLM(tiny_model_dir("qwen3"), runner="pooling", speculative_config=NGRAM)


def test_served_with_drafts(tiny_model_dir):
    """``--speculative-config`` on the server: streamed and whole answers agree, and /metrics
    counts the drafts."""
    srv = ServerProcess(
        [
            tiny_model_dir("llama"),
            "--served-model-name", MODEL_NAME,
            "--dtype", "float32",
            "--speculative-config", json.dumps(NGRAM),
        ]
    ).wait_ready()  # fmt: skip
    try:
        client = srv.client()
        args = {"model": MODEL_NAME, "prompt": PROMPTS[1], "max_tokens": 40, "temperature": 0}
        whole = client.completions.create(**args)
        streamed = "".join(
            chunk.choices[0].text for chunk in client.completions.create(**args, stream=True)
        )
        assert streamed == whole.choices[0].text
        assert whole.usage.completion_tokens == 40
        m = wait_until_idle(srv.url)
        assert m["pagedserve:spec_decode_num_draft_tokens_total"] > 0
        assert 0 < m["pagedserve:spec_decode_num_accepted_tokens_total"]
        assert m["pagedserve:kv_cache_usage_perc"] == 0
        m = metrics(srv.url)
        assert m["pagedserve:spec_decode_num_drafts_total"] > 0
        first = f'pagedserve:spec_decode_num_accepted_tokens_per_pos_total{{model_name="{MODEL_NAME}",position="0"}}'
        assert 0 < m[first] <= m["pagedserve:spec_decode_num_drafts_total"]
        assert (
            m["pagedserve:spec_decode_num_accepted_tokens_per_pos_total"]
            == (m["pagedserve:spec_decode_num_accepted_tokens_total"])
        )
    finally:
        srv.close()
