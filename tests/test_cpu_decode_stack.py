"""Pure-decode steps on the CPU run all decoder layers in one C call (:mod:`pagedserve.worker.
cpu_decode`); generations equal the module-by-module forward's (``enforce_eager``) to the last bit:
float32, bfloat16 and quantized panels, biases, 16-bit K/V pools, batches that grow and shrink."""

from __future__ import annotations

import pytest
from gguf import GGMLQuantizationType as Q
from tiny_models import tiny_hf_model, write_lora_adapter, write_tiny_gguf

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.kernels import packed_gemm
from pagedserve.worker.cpu_decode import CpuDecodeStack

# 40 prompts across block boundaries with budgets that end them at different steps: decode steps
# of more than 32 sequences (float32 panels) shrink to a few (quantized panels, where there are).
PROMPTS = [[3 + (7 * i + j) % 900 for j in range(2 + 3 * i % 61)] for i in range(40)]
MAX_TOKENS = [4 + 5 * i % 37 for i in range(40)]


def _generate(model: str, monkeypatch, enforce_eager: bool, **engine_args) -> tuple[list, int]:
    """Greedy generations with their top logprobs, and how many steps the stack ran."""
    runs = []
    run = CpuDecodeStack.run

    def counting(self, input_ids, positions, meta, *adapter):
        runs.append(len(input_ids))
        return run(self, input_ids, positions, meta, *adapter)

    monkeypatch.setattr(CpuDecodeStack, "run", counting)
    engine_args.setdefault("dtype", "float32")
    llm = LLM(
        model,
        device="cpu",
        kv_cache_memory=0.02,
        max_num_seqs=40,
        enforce_eager=enforce_eager,
        **engine_args,
    )
    assert (llm.llm_engine.runner.cpu_stack is None) == enforce_eager
    params = [
        SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, logprobs=3) for n in MAX_TOKENS
    ]
    outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
    generations = [
        (c.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs])
        for c in (o.outputs[0] for o in outputs)
    ]
    return generations, len(runs)


@pytest.mark.parametrize(
    ("kind", "kv_cache_dtype"),
    [
        ("llama", "auto"),
        ("qwen2", "auto"),
        ("qwen3", "auto"),
        ("llama_tied", "float16"),
        ("llama", "bfloat16"),
    ],
)
def test_stack_equals_the_modules(kind, kv_cache_dtype, tiny_model_dir, monkeypatch):
    model = tiny_model_dir(kind)
    want, eager_runs = _generate(model, monkeypatch, True, kv_cache_dtype=kv_cache_dtype)
    got, runs = _generate(model, monkeypatch, False, kv_cache_dtype=kv_cache_dtype)
    assert eager_runs == 0 and runs > 30
    assert got == want


@pytest.mark.skipif(not packed_gemm.bf16_available(), reason="this CPU lacks AVX512-BF16")
@pytest.mark.parametrize("kind", ["llama_tied", "qwen2", "qwen3"])
def test_stack_equals_the_modules_with_bfloat16_panels(kind, tiny_model_dir, monkeypatch):
    model = tiny_model_dir(kind)
    want, _ = _generate(model, monkeypatch, True, dtype="bfloat16")
    got, runs = _generate(model, monkeypatch, False, dtype="bfloat16")
    assert runs > 30
    assert got == want


@pytest.mark.parametrize(
    "dtype", ["float32", *(["bfloat16"] if packed_gemm.bf16_available() else [])]
)
def test_stack_decodes_through_quantized_panels(dtype, tmp_path, monkeypatch):
    """A Q4_1 GGUF: steps of few sequences (at most 32 beside float32 panels, 8 beside bfloat16
    ones) multiply with its blocks, larger ones with the other panels, in the stack as in the
    modules."""
    path = str(
        write_tiny_gguf(tiny_hf_model("llama"), tmp_path / "tiny.gguf", Q.Q4_1, with_tokenizer=True)
    )
    want, _ = _generate(path, monkeypatch, True, dtype=dtype)
    got, runs = _generate(path, monkeypatch, False, dtype=dtype)
    assert runs > 30
    assert got == want


def test_steps_the_stack_leaves_to_the_modules(tiny_model_dir, monkeypatch):
    """Steps that want prompt logprobs run module by module (the stack gives only the last
    hidden states); so does every step of the reference attention backend, which the stack's
    kernels are tested against."""
    model = tiny_model_dir("llama")
    llm = LLM(model, device="cpu", kv_cache_memory=0.02)
    runner = llm.llm_engine.runner
    assert runner.cpu_stack is not None
    runs = []
    monkeypatch.setattr(runner.cpu_stack, "run", lambda *args: runs.append(args))
    params = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=1)
    llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    assert runs == []

    monkeypatch.setenv("PAGEDSERVE_ATTENTION_BACKEND", "reference")
    reference = LLM(model, device="cpu", kv_cache_memory=0.02)
    assert reference.llm_engine.runner.cpu_stack is None


def test_models_whose_layers_the_driver_does_not_lay_out(tiny_model_dir):
    """Models that rotate only part of each head decode module by module (Gemma 2 and 3 take
    the stack: tests/test_cpu_decode_stack_gemma.py)."""
    llm = LLM(tiny_model_dir("phi3_partial"), device="cpu", kv_cache_memory=0.02)
    assert llm.llm_engine.runner.cpu_stack is None


@pytest.mark.parametrize("kind", ["mistral", "qwen2_window"])
def test_sliding_window_steps_take_the_stack(kind, tiny_model_dir, monkeypatch):
    """The driver's attention takes each layer's window (8 positions here), so steps whose
    contexts are longer take the stack too, and equal the module-by-module ones bit for bit."""
    prompts = [[3 + i, 40 + i] for i in range(4)]  # 2 tokens, then 1-10 more: past the window

    def generate(enforce_eager: bool) -> tuple[list, list[int]]:
        runs: list[int] = []
        run = CpuDecodeStack.run

        def counting(self, input_ids, positions, meta, *adapter):
            runs.append(meta.max_seq_len)
            return run(self, input_ids, positions, meta, *adapter)

        monkeypatch.setattr(CpuDecodeStack, "run", counting)
        llm = LLM(
            tiny_model_dir(kind), device="cpu", kv_cache_memory=0.02, enforce_eager=enforce_eager
        )
        params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True, logprobs=2)
        outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs], runs

    want, _ = generate(enforce_eager=True)
    got, runs = generate(enforce_eager=False)
    assert runs and max(runs) > 8
    assert [g[0] for g in got] == [w[0] for w in want]
    for g, w in zip(got, want, strict=True):
        for step_g, step_w in zip(g[1], w[1], strict=True):
            assert {t: lp.logprob for t, lp in step_g.items()} == {
                t: lp.logprob for t, lp in step_w.items()
            }


def test_stack_needs_packed_weights(tiny_model_dir, monkeypatch):
    """Without the C GEMM's packed weights (float16 modules, or prepacking off) there is no
    stack."""
    model = tiny_model_dir("llama")
    half = LLM(model, device="cpu", dtype="float16", kv_cache_memory=0.02)
    assert half.llm_engine.runner.cpu_stack is None
    monkeypatch.setenv("PAGEDSERVE_DISABLE_PREPACK", "1")
    llm = LLM(model, device="cpu", dtype="float32", kv_cache_memory=0.02)
    assert llm.llm_engine.runner.cpu_stack is None


def test_steps_with_adapters_take_the_stack(
    tmp_path, tiny_model_dir, smollm2_tokenizer, monkeypatch
):
    """Decode steps whose sequences run LoRA adapters (one for all, or a mix of two and of the
    base model) go through the driver with their terms, and each sequence answers as the base
    model with its adapter merged in (up to rounding: the modules add the terms with PyTorch's
    matmuls)."""
    references, loras = [], []
    for seed in (3, 4):
        merged = write_lora_adapter(tmp_path / f"adapter{seed}", "llama", seed=seed, rank=8)
        merged.save_pretrained(tmp_path / f"merged{seed}")
        smollm2_tokenizer.save_pretrained(tmp_path / f"merged{seed}")
        references.append(LLM(str(tmp_path / f"merged{seed}"), device="cpu", dtype="float32"))
        loras.append(LoRARequest(f"a{seed}", seed, str(tmp_path / f"adapter{seed}")))
    references.append(LLM(tiny_model_dir("llama"), device="cpu", dtype="float32"))
    loras.append(None)
    slots = []
    run = CpuDecodeStack.run

    def counting(self, input_ids, positions, meta, adapters=None):
        slots.append(None if adapters is None else set(adapters[1].tolist()))
        return run(self, input_ids, positions, meta, adapters)

    monkeypatch.setattr(CpuDecodeStack, "run", counting)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=1)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS[:6]]
    llm = LLM(tiny_model_dir("llama"), device="cpu", dtype="float32", enable_lora=True)
    alone = llm.generate(prompts, params, use_tqdm=False, lora_request=loras[0])
    assert slots and all(s == {0} for s in slots)
    slots.clear()
    per_prompt = [loras[i % 3] for i in range(len(prompts))]
    mixed = llm.generate(prompts, params, use_tqdm=False, lora_request=per_prompt)
    assert {0, 1, -1} in slots
    want = [references[0].generate(prompts, params, use_tqdm=False)]
    want += [references[i % 3].generate([p], params, use_tqdm=False) for i, p in enumerate(prompts)]
    for out, ref in zip(alone + mixed, want[0] + [w[0] for w in want[1:]], strict=True):
        (c,), (r,) = out.outputs, ref.outputs
        assert c.token_ids == r.token_ids
        logprobs = [step[t].logprob for step, t in zip(c.logprobs, c.token_ids, strict=True)]
        expected = [step[t].logprob for step, t in zip(r.logprobs, r.token_ids, strict=True)]
        assert logprobs == pytest.approx(expected, abs=1e-4)
