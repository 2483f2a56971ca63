"""Gemma 2 and Gemma 3 decode steps go through the CPU's one-call decode stack
(:mod:`pagedserve.worker.cpu_decode`) and equal the module-by-module forward's to the last bit:
every step's logits, and greedy generations with their logprobs, across sliding windows, K/V pool
dtypes, bfloat16 and quantized panels."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as Q
from stack_runs import assert_generations_equal, greedy_runs, stack_llm
from tiny_models import _SIZES, tiny_hf_model, write_tiny_gguf, write_tiny_model
from transformers import Gemma2Config, Gemma2ForCausalLM

from pagedserve.kernels import packed_gemm
from pagedserve.worker.cpu_decode import CpuDecodeStack

WINDOW = 8


@pytest.fixture(scope="module")
def gemma_dir(tmp_path_factory, smollm2_tokenizer):
    """``gemma_dir(kind)``: ``gemma3`` (a sliding first layer, two RoPE bases, q/k norms),
    ``gemma3_gguf`` (six layers, five sliding) or ``gemma2_wide`` (Gemma 2 with heads of 128,
    which the soft-capped decode kernel takes; tests/tiny_models.py's ``gemma2`` has 32)."""
    made: dict[str, str] = {}

    def make(kind: str) -> str:
        if kind not in made:
            path = tmp_path_factory.mktemp(f"stack_{kind}")
            if kind == "gemma2_wide":
                _tiny_gemma2_wide().save_pretrained(path)
                smollm2_tokenizer.save_pretrained(path)
            else:
                write_tiny_model(path, kind, smollm2_tokenizer)
            made[kind] = str(path)
        return made[kind]

    return make


def _tiny_gemma2_wide() -> Gemma2ForCausalLM:
    config = Gemma2Config(
        **{**_SIZES, "num_hidden_layers": 3},
        head_dim=128,
        query_pre_attn_scalar=24,
        sliding_window=WINDOW,
        attn_logit_softcapping=2.0,
        final_logit_softcapping=5.0,
        attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = Gemma2ForCausalLM(config).float().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.1 * torch.randn_like(param))  # Gemma's norms: 1 + weight, around 1
    return model


@pytest.mark.parametrize(
    ("kind", "kv_cache_dtype"),
    [
        ("gemma3", "auto"),
        ("gemma3_gguf", "auto"),
        ("gemma2_wide", "auto"),
        ("gemma3", "float16"),
        ("gemma2_wide", "bfloat16"),
    ],
)
def test_every_step_equals_the_modules(kind, kv_cache_dtype, gemma_dir, monkeypatch):
    """Each step through the stack: the module-by-module forward runs it first (writing the same
    K/V), and the two steps' logits are equal, batches of several lengths past the window."""
    steps: list[tuple[int, int, bool]] = []
    run = CpuDecodeStack.run

    def checking(self, input_ids, positions, meta, *adapters):
        want = self.model.compute_logits(self.model(input_ids, positions, meta))
        hidden = run(self, input_ids, positions, meta, *adapters)
        got = self.model.compute_logits(hidden)
        steps.append((len(input_ids), meta.max_seq_len, torch.equal(got, want)))
        return hidden

    monkeypatch.setattr(CpuDecodeStack, "run", checking)
    llm = stack_llm(gemma_dir(kind), False, kv_cache_dtype=kv_cache_dtype)
    assert llm.llm_engine.runner.cpu_stack is not None
    greedy_runs(llm)
    assert len(steps) > 10
    assert max(rows for rows, _, _ in steps) > 4 and max(n for _, n, _ in steps) > 3 * WINDOW
    assert all(equal for _, _, equal in steps)


@pytest.mark.parametrize(
    ("kind", "engine_args"),
    [
        ("gemma3", {}),
        ("gemma2_wide", {"kv_cache_dtype": "float16"}),
        *(
            [("gemma3_gguf", {"dtype": "bfloat16"}), ("gemma2_wide", {"dtype": "bfloat16"})]
            if packed_gemm.bf16_available()
            else []
        ),
    ],
)
def test_generations_equal_the_modules(kind, engine_args, gemma_dir, monkeypatch):
    """Greedy generations with their top logprobs: through the stack as with ``enforce_eager``
    (float32 or bfloat16 panels, 16-bit K/V pools)."""
    assert_generations_equal(gemma_dir(kind), monkeypatch, **engine_args)


@pytest.mark.parametrize(
    "dtype", ["float32", *(["bfloat16"] if packed_gemm.bf16_available() else [])]
)
def test_quantized_gemma3_equals_the_modules(dtype, tmp_path, monkeypatch):
    """A Q4_1 GGUF of Gemma 3: few-sequence steps multiply with its blocks, in the stack as in
    the modules."""
    path = str(
        write_tiny_gguf(
            tiny_hf_model("gemma3_gguf"), tmp_path / "tiny.gguf", Q.Q4_1, with_tokenizer=True
        )
    )
    want = greedy_runs(stack_llm(path, True, dtype=dtype))
    llm = stack_llm(path, False, dtype=dtype)
    assert llm.llm_engine.runner.cpu_stack is not None
    assert greedy_runs(llm) == want


def test_gemma2_heads_the_capped_kernel_lacks(tiny_model_dir):
    """Gemma 2 soft-caps its scores, which the C decode kernel does at heads of 128 and 256 only:
    with heads of 32 its steps (like its modules' attention) stay in PyTorch."""
    llm = stack_llm(tiny_model_dir("gemma2"), False)
    assert llm.llm_engine.runner.cpu_stack is None
