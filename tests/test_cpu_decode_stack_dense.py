"""Granite and Gemma 1 decode steps go through the CPU's one-call decode stack
(:mod:`pagedserve.worker.cpu_decode`) and equal the module-by-module forward's to the last bit:
every step's logits (Granite's residual multiplier and scores' scale, Gemma 1's GeGLU without
the outputs' norms), and greedy generations with their logprobs, across K/V pool dtypes and
bfloat16 panels."""

from __future__ import annotations

import pytest
import torch
from tiny_dense import write_dense_model

from pagedserve import LLM, SamplingParams
from pagedserve.kernels import packed_gemm
from pagedserve.worker.cpu_decode import CpuDecodeStack

# Prompts of 2 to 29 tokens with budgets that end them at different steps: batches that shrink,
# sequences of different lengths across block boundaries (block_size 16).
PROMPTS = [[3 + (7 * i + j) % 900 for j in range(2 + 3 * i % 28)] for i in range(12)]
MAX_TOKENS = [4 + 5 * i % 17 for i in range(12)]
KINDS = ["gemma", "granite"]


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory, smollm2_tokenizer):
    """``dense_dir(kind)``: tests/tiny_dense.py's model of ``kind``, with SmolLM2's tokenizer."""
    made: dict[str, str] = {}

    def make(kind: str) -> str:
        if kind not in made:
            path = tmp_path_factory.mktemp(f"stack_{kind}")
            made[kind] = str(write_dense_model(path, kind, smollm2_tokenizer))
        return made[kind]

    return make


def _llm(model: str, enforce_eager: bool, **engine_args) -> LLM:
    engine_args.setdefault("dtype", "float32")
    return LLM(
        model,
        device="cpu",
        kv_cache_memory=0.02,
        max_num_seqs=16,
        enforce_eager=enforce_eager,
        **engine_args,
    )


def _generate(llm: LLM) -> list:
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3) for n in MAX_TOKENS
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    return [
        (c.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs])
        for c in (o.outputs[0] for o in outputs)
    ]


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
    llm = _llm(dense_dir(kind), False, kv_cache_dtype=kv_cache_dtype)
    assert llm.llm_engine.runner.cpu_stack is not None
    _generate(llm)
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
    runs = []
    run = CpuDecodeStack.run

    def counting(self, *args):
        runs.append(1)
        return run(self, *args)

    monkeypatch.setattr(CpuDecodeStack, "run", counting)
    want = _generate(_llm(dense_dir(kind), True, **engine_args))
    assert not runs
    got = _generate(_llm(dense_dir(kind), False, **engine_args))
    assert len(runs) > 10
    assert got == want
