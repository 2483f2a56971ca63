"""``dtype="bfloat16"`` on a CPU with AVX512-BF16: float32 modules whose matmuls take bfloat16
panels (weights and inputs rounded, sums in float32) over a bfloat16 KV cache, through the same C
kernels as float32; close to transformers' float32 numbers. Elsewhere PyTorch's bfloat16
modules run it."""

from __future__ import annotations

import pytest
import torch
from paged_steps import random_step

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import packed_gemm, prefill_attention
from pagedserve.model.layers.attention import Attention, reference_paged_attention
from pagedserve.model.layers.linear import QUANTIZED_MAX_ROWS_BF16, Linear, packed_for

needs_bf16 = pytest.mark.skipif(
    not packed_gemm.bf16_available(), reason="this CPU lacks AVX512-BF16"
)


@needs_bf16
def test_float32_modules_multiply_with_bfloat16_panels(tiny_model_dir):
    engine = LLM(tiny_model_dir("llama_tied"), device="cpu", dtype="bfloat16").llm_engine
    model = engine.model
    assert engine.dtype == torch.bfloat16 and engine.kv_cache_dtype == torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    linears = [m for m in model.modules() if isinstance(m, Linear)]
    assert linears and all(m.packed.dtype == torch.bfloat16 for m in linears)
    assert model.packed_head.dtype == torch.bfloat16
    assert engine.runner.kv_cache.k[0].dtype == torch.bfloat16
    assert engine.runner.cpu_stack is not None
    layers = [m for m in model.modules() if isinstance(m, Attention)]
    assert layers and all(m.bf16_products for m in layers)


@needs_bf16
def test_quantized_panels_serve_fewer_rows_beside_bfloat16_panels(smollm2_path):
    """A GGUF's quantized panels stream fewer bytes, but bfloat16 panels multiply twice as fast:
    the quantized ones take steps of at most 8 rows here (32 beside float32 panels)."""
    model = LLM(smollm2_path, device="cpu", dtype="bfloat16", kv_cache_memory=0.01).llm_engine.model
    layer = model.model.layers[0].mlp.down_proj
    assert layer.packed.dtype == torch.bfloat16 and layer.packed_quantized is not None
    few = torch.randn(QUANTIZED_MAX_ROWS_BF16, layer.in_features)
    many = torch.randn(QUANTIZED_MAX_ROWS_BF16 + 1, layer.in_features)
    assert packed_for(few, layer.packed, layer.packed_quantized) is layer.packed_quantized
    assert packed_for(many, layer.packed, layer.packed_quantized) is layer.packed


def test_without_bf16_panels_pytorch_runs_bfloat16_modules(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(packed_gemm, "bf16_available", lambda: False)
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in llm.llm_engine.model.parameters()} == {torch.bfloat16}
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert len(llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0].token_ids) == 5


@needs_bf16
def test_smollm2_prompt_logprobs_stay_close(smollm2_path, prompt_logprob_errors):
    """A 79-token prompt in chunks of 48 (more rows than the quantized panels take, so the
    bfloat16 panels multiply): the largest logprob difference from transformers' float32 model
    measured 0.12 (0.082 with float32 attention products); transformers' own bfloat16 model
    differs from it by up to 0.18."""
    llm = LLM(
        smollm2_path,
        device="cpu",
        dtype="bfloat16",
        kv_cache_memory=0.125,
        max_num_batched_tokens=48,
    )
    errors, _ = prompt_logprob_errors(llm)
    assert max(errors) < 0.25
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks


@pytest.mark.skipif(
    not prefill_attention.bf16_products_available(torch.bfloat16),
    reason="this CPU lacks AVX512-BF16",
)
@pytest.mark.parametrize(
    "query_lens,seq_lens,step_args",
    [
        ([100], [100], {}),
        ([37, 64, 2], [101, 200, 40], {}),
        ([45, 30], [45, 100], {"block_size": 5}),
        ([70, 20], [70, 90], {"num_heads": 16, "num_kv_heads": 2, "head_dim": 128}),
        ([50, 9], [50, 77], {"head_dim": 20}),  # no bfloat16 products for this head size
        ([300, 37], [300, 101], {"window": 40}),  # a sliding window
    ],
)
def test_prefill_attention_with_bfloat16_products(query_lens, seq_lens, step_args):
    """Q and P rounded to bfloat16 (head sizes 64 and 128): within bfloat16's precision of the
    float32 reference over the same bfloat16 pool; other head sizes exactly as in float32."""
    window = step_args.pop("window", None)
    q, _, _, k_cache, v_cache, meta = random_step(
        query_lens, seq_lens, kv_dtype=torch.bfloat16, **step_args
    )
    scale = q.shape[-1] ** -0.5
    expected = reference_paged_attention(q, k_cache, v_cache, meta, scale, window)
    got = prefill_attention.prefill_attention(
        q,
        k_cache,
        v_cache,
        meta.block_tables,
        meta.query_start_loc,
        meta.seq_lens,
        scale,
        bf16_products=True,
        window=window,
    )
    error = (got - expected).abs().max().item()
    if q.shape[-1] in (64, 128):
        assert 1e-5 < error < 2e-2 * expected.abs().max().item()
    else:
        assert error < 2e-5
