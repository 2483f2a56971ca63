"""A 16-bit KV cache (``kv_cache_dtype``): the C kernels read float16 and bfloat16 pools exactly
as the reference reads them, the cache holds twice the tokens, and the model stays close to
transformers' float32 numbers."""

from __future__ import annotations

import pytest
import torch
from paged_steps import random_step

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import kv_store, paged_decode_attention, prefill_attention
from pagedserve.model.layers.attention import (
    _decode_torch,
    fast_paged_attention,
    reference_paged_attention,
)

HALF_TYPES = [torch.float16, torch.bfloat16]
# The kernels and the reference compute in float32 from the same rounded pools.
TOL = {"atol": 2e-5, "rtol": 2e-5}


@pytest.mark.parametrize("kv_dtype", HALF_TYPES)
def test_stores_round_to_the_pool_type(kv_dtype):
    q, k, v, k_cache, v_cache, meta = random_step([5, 1], [5, 20], kv_dtype=kv_dtype)
    assert k_cache.dtype == v_cache.dtype == kv_dtype
    flat_k = k_cache.view(-1, *k.shape[1:])
    flat_v = v_cache.view(-1, *v.shape[1:])
    assert torch.equal(flat_k[meta.slot_mapping], k.to(kv_dtype))
    assert torch.equal(flat_v[meta.slot_mapping], v.to(kv_dtype))


@pytest.mark.parametrize("kv_dtype", HALF_TYPES)
def test_the_c_store_rounds_edge_values_as_torch_does(kv_dtype):
    """Ties, overflow, the smallest normals and subnormals and infinities bit for bit; NaN as a NaN."""
    edges = torch.tensor(
        [1 + 2**-8, 1 + 3 * 2**-8, 1 + 2**-11, 1 + 3 * 2**-11, 65519.0, 65520.0, 1e38, 3.4e38,
         2**-14, 2**-24, 2**-25, 1e-40, -0.0, float("inf"), float("-inf"), float("nan")]
    )  # fmt: skip
    k = torch.cat([edges, -edges, torch.randn(32)]).view(-1, 1, 16)
    v = k.flip(0)
    slots = torch.arange(k.shape[0])
    pools = [torch.zeros(k.shape[0], 1, 1, 16, dtype=kv_dtype) for _ in range(2)]
    assert kv_store.supports(k, v, *pools)
    kv_store.write_kv(k, v, *pools, slots)
    for pool, x in zip(pools, (k, v), strict=True):
        got, expected = pool.flatten(), x.to(kv_dtype).flatten()
        nan = expected.isnan()  # which NaN bit pattern comes out is not specified
        assert torch.equal(got.isnan(), nan)
        assert torch.equal(got[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("kv_dtype", HALF_TYPES)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim,block_size",
    [(9, 3, 64, 16), (4, 4, 128, 16), (8, 2, 48, 32), (20, 2, 16, 64), (6, 1, 112, 8)],
)
def test_decode_kernel_reads_16_bit_pools(kv_dtype, num_heads, num_kv_heads, head_dim, block_size):
    seq_lens = [1, 15, 16, 17, 33, 300, 64 * 3 + 5]
    shape = {"num_heads": num_heads, "num_kv_heads": num_kv_heads, "head_dim": head_dim}
    q, _, _, k_cache, v_cache, meta = random_step(
        [1] * len(seq_lens), seq_lens, block_size=block_size, kv_dtype=kv_dtype, **shape
    )
    assert paged_decode_attention.supports(q, k_cache), "gcc is on every supported machine"
    scale = head_dim**-0.5
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    got = paged_decode_attention.paged_decode_attention(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, scale
    )
    torch.testing.assert_close(got, expected, **TOL)
    portable = _decode_torch(
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.max_seq_len, scale
    )
    torch.testing.assert_close(portable, expected, **TOL)


@pytest.mark.parametrize("kv_dtype", HALF_TYPES)
@pytest.mark.parametrize(
    "query_lens,seq_lens,step_args",
    [
        ([100], [100], {}),
        ([37, 64, 2], [101, 200, 40], {}),
        ([45, 30], [45, 100], {"block_size": 5}),
        ([50, 9], [50, 77], {"head_dim": 20}),
        ([70, 20], [70, 90], {"num_heads": 16, "num_kv_heads": 2, "head_dim": 128}),
    ],
)
def test_prefill_kernel_reads_16_bit_pools(kv_dtype, query_lens, seq_lens, step_args):
    q, _, _, k_cache, v_cache, meta = random_step(
        query_lens, seq_lens, kv_dtype=kv_dtype, **step_args
    )
    assert prefill_attention.supports(q, k_cache), "gcc is on every supported machine"
    scale = q.shape[-1] ** -0.5
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale)
    got = prefill_attention.prefill_attention(
        q, k_cache, v_cache, meta.block_tables, meta.query_start_loc, meta.seq_lens, scale
    )
    torch.testing.assert_close(got, expected, **TOL)


@pytest.mark.parametrize("kv_dtype", HALF_TYPES)
def test_mixed_step_through_the_fast_backend(kv_dtype):
    q, k, v, k_cache, v_cache, meta = random_step(
        [1, 30, 1, 17, 5, 1], [40, 30, 9, 50, 5, 300], kv_dtype=kv_dtype
    )
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125)
    got = fast_paged_attention(q, k, v, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got, expected, **TOL)


def test_pools_the_kernels_lack_fall_back_to_torch():
    q, k, v, k_cache, v_cache, meta = random_step([1, 12], [30, 12], kv_dtype=torch.float64)
    assert not paged_decode_attention.supports(q, k_cache)
    assert not prefill_attention.supports(q, k_cache)
    assert not kv_store.supports(k, v, k_cache, v_cache)  # random_step stored through torch
    expected = reference_paged_attention(q, k_cache, v_cache, meta, 0.125)
    got = fast_paged_attention(q, k, v, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(got, expected, **TOL)


def test_a_16_bit_cache_holds_twice_the_tokens(tiny_model_dir):
    path = tiny_model_dir("llama")
    wide = LLM(path, dtype="float32", kv_cache_memory=0.002).llm_engine
    narrow = LLM(path, dtype="float32", kv_cache_memory=0.002, kv_cache_dtype="float16").llm_engine
    assert wide.kv_cache_dtype == torch.float32 and narrow.kv_cache_dtype == torch.float16
    assert narrow.runner.kv_cache.k[0].dtype == torch.float16
    assert narrow.num_blocks == 2 * wide.num_blocks


@pytest.mark.parametrize(
    "dtype,kv_cache_dtype",
    [("bfloat16", "float32"), ("float16", "bfloat16"), ("float32", "float16")],
)
def test_any_model_and_cache_types_generate(dtype, kv_cache_dtype, tiny_model_dir):
    """Models of any type read pools of another type: the torch paths (no C kernel takes 16-bit
    queries) and bfloat16 panels' float32 modules alike."""
    llm = LLM(tiny_model_dir("llama"), dtype=dtype, kv_cache_dtype=kv_cache_dtype)
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outs = llm.generate(["Hello there", "A longer prompt " * 8], params, use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outs] == [6, 6]
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


def test_the_engine_builds_its_kernels_before_the_first_request(monkeypatch, tiny_model_dir):
    asked = set()
    for module in (paged_decode_attention, prefill_attention, kv_store):

        def available(kv_dtype, original=module.available, name=module.__name__):
            asked.add((name.rsplit(".", 1)[-1], kv_dtype))
            return original(kv_dtype)

        monkeypatch.setattr(module, "available", available)
    LLM(tiny_model_dir("llama"), device="cpu", kv_cache_dtype="bfloat16")
    assert asked == {
        ("paged_decode_attention", torch.bfloat16),
        ("prefill_attention", torch.bfloat16),
        ("kv_store", torch.bfloat16),
    }


@pytest.mark.parametrize("name", ["fp8", "int8", "float64"])
def test_unsupported_cache_types_are_refused(name, tiny_model_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32"):
        LLM(tiny_model_dir("llama"), kv_cache_dtype=name)


def test_float16_outputs_do_not_depend_on_the_batch(smollm2_path):
    """Alone, or in a batch small enough a cache (16 blocks) that requests are preempted and
    recomputed: the same greedy tokens, and every block back at the end."""
    llm = LLM(
        smollm2_path,
        kv_cache_dtype="float16",
        kv_cache_memory=16 * 16 * 23040 / (1 << 30),
        enable_prefix_caching=False,
    )
    prompts = ["The capital of France is", "def fibonacci(n):", "List three colours:"] * 3
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    alone = [llm.generate([p], greedy, use_tqdm=False)[0].outputs[0].token_ids for p in prompts]
    batch = llm.generate(prompts, greedy, use_tqdm=False)
    assert [out.outputs[0].token_ids for out in batch] == alone
    stats = llm.llm_engine.get_stats()
    assert stats.num_preemptions > 0
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.parametrize("kv_cache_dtype,bound", [("float16", 0.02), ("bfloat16", 0.1)])
def test_smollm2_prompt_logprobs_stay_close(
    kv_cache_dtype, bound, smollm2_path, prompt_logprob_errors
):
    """Over a 79-token prompt in 16-token chunks (so later chunks read the rounded cache), the
    largest logprob difference from transformers measured 0.006 (float16) and 0.035 (bfloat16);
    float32 pools: 4e-5."""
    llm = LLM(
        smollm2_path,
        dtype="float32",
        kv_cache_memory=0.125,
        max_num_batched_tokens=16,
        kv_cache_dtype=kv_cache_dtype,
    )
    errors, out = prompt_logprob_errors(llm)
    assert max(errors) <= bound
    assert len(out.outputs[0].token_ids) == 4
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
