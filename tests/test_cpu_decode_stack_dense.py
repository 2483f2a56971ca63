"""Granite, Gemma 1 and OLMo 2 decode steps go through the CPU's one-call decode stack
(:mod:`pagedserve.worker.cpu_decode`) and equal the module-by-module forward's to the last bit:
every step's logits (Granite's residual multiplier and scores' scale, Gemma 1's GeGLU without
the outputs' norms, OLMo 2's norms after the blocks and q/k norms over whole projections), and
greedy generations with their logprobs, across K/V pool dtypes and bfloat16 panels."""

from __future__ import annotations

import pytest
import torch
from stack_runs import assert_generations_equal, greedy_runs, stack_llm

from pagedserve.kernels import packed_gemm
from pagedserve.worker.cpu_decode import CpuDecodeStack

KINDS = ["gemma", "granite", "olmo2"]


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "float16", "bfloat16"])
@pytest.mark.parametrize("kind", KINDS)
def test_every_step_equals_the_modules(kind, kv_cache_dtype, dense_dir, monkeypatch):
    """Each step through the stack: the module-by-module forward runs it first (writing the same
    K/V), and the two steps' logits (Granite's divided by its logits scaling) are equal."""
    steps: list[tuple[int, bool]] = []
    run = CpuDecodeStack.run

    def checking(self, input_ids, positions, meta, *adapters):
        want = self.model.compute_logits(self.model(input_ids, positions, meta))
        hidden = run(self, input_ids, positions, meta, *adapters)
        got = self.model.compute_logits(hidden)
        steps.append((len(input_ids), torch.equal(got, want)))
        return hidden

    monkeypatch.setattr(CpuDecodeStack, "run", checking)
    llm = stack_llm(dense_dir(kind), False, kv_cache_dtype=kv_cache_dtype)
    assert llm.llm_engine.runner.cpu_stack is not None
    greedy_runs(llm)
    assert len(steps) > 10 and max(rows for rows, _ in steps) > 4
    assert all(equal for _, equal in steps)


@pytest.mark.parametrize(
    "engine_args",
    [
        {},
        {"kv_cache_dtype": "float16"},
        *([{"dtype": "bfloat16"}] if packed_gemm.bf16_available() else []),
    ],
)
@pytest.mark.parametrize("kind", KINDS)
def test_generations_equal_the_modules(kind, engine_args, dense_dir, monkeypatch):
    """Greedy generations with their top logprobs: through the stack as with ``enforce_eager``
    (float32 or bfloat16 panels, 16-bit K/V pools)."""
    assert_generations_equal(dense_dir(kind), monkeypatch, **engine_args)
