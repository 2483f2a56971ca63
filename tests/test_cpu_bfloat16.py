"""``dtype="bfloat16"`` on a CPU with AVX512-BF16: float32 modules whose matmuls take bfloat16
panels (weights and inputs rounded, sums in float32) over a bfloat16 KV cache, through the same C
kernels as float32; close to transformers' float32 numbers. Elsewhere PyTorch's bfloat16
modules run it."""

from __future__ import annotations

import pytest
import torch

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import packed_gemm
from pagedserve.model.layers.linear import Linear

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


def test_without_bf16_panels_pytorch_runs_bfloat16_modules(tiny_model_dir, monkeypatch):
    monkeypatch.setattr(packed_gemm, "bf16_available", lambda: False)
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="bfloat16")
    assert {p.dtype for p in llm.llm_engine.model.parameters()} == {torch.bfloat16}
    params = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    assert len(llm.generate(["Hello there"], params, use_tqdm=False)[0].outputs[0].token_ids) == 5


@needs_bf16
def test_smollm2_prompt_logprobs_stay_close(smollm2_path, hf_smollm2):
    """A 79-token prompt in chunks of 48 (more rows than the quantized panels take, so the
    bfloat16 panels multiply): the largest logprob difference from transformers' float32 model
    measured 0.082; transformers' own bfloat16 model differs from it by up to 0.18."""
    llm = LLM(smollm2_path, dtype="bfloat16", kv_cache_memory=0.125, max_num_batched_tokens=48)
    text = "The quick brown fox jumps over the lazy dog near the river. " * 6
    ids = llm.get_tokenizer().encode(text)
    params = SamplingParams(temperature=0, max_tokens=4, prompt_logprobs=0)
    out = llm.generate([{"prompt_token_ids": ids}], params, use_tqdm=False)[0]
    with torch.inference_mode():
        expected = torch.log_softmax(hf_smollm2(torch.tensor([ids])).logits[0], dim=-1)
    diffs = [
        abs(out.prompt_logprobs[pos][ids[pos]].logprob - expected[pos - 1, ids[pos]].item())
        for pos in range(1, len(ids))
    ]
    assert max(diffs) < 0.25
    stats = llm.llm_engine.get_stats()
    assert stats.num_free_blocks == stats.num_total_blocks
