"""Mixture-of-Experts decoders (Mixtral, Qwen2-MoE, Qwen3-MoE): our logits equal transformers'
on tiny random models, prefill and decode, however the tokens are batched; greedy generation
through the engine equals transformers' ``generate``; both checkpoint layouts load; what is not
supported for MoE is refused with a clear error."""

from __future__ import annotations

import pytest
import torch
from gguf import GGUFWriter
from safetensors import safe_open
from tiny_models import PagedRunner
from tiny_moe import MOE_KINDS, tiny_moe_model, write_tiny_moe

from pagedserve import LLM, SamplingParams
from pagedserve.model.layers.fused_moe import FusedExperts
from pagedserve.model.loader import bf16_matmuls_in_float32, load_config, load_model
from pagedserve.worker.cpu_decode import CpuDecodeStack

ATOL = 1e-4


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(3)
    lengths = [5, 17, 40, 1, 33]  # ragged; some cross block boundaries (block_size 16)
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def moe_dir(tmp_path_factory, smollm2_tokenizer):
    """``moe_dir(kind, stacked=False)`` -> a tiny MoE model directory with SmolLM2's tokenizer."""
    made: dict[tuple[str, bool], str] = {}

    def make(kind: str, stacked: bool = False) -> str:
        if (kind, stacked) not in made:
            path = tmp_path_factory.mktemp(f"tiny_{kind}")
            made[kind, stacked] = str(write_tiny_moe(path, kind, smollm2_tokenizer, stacked))
        return made[kind, stacked]

    return make


@pytest.fixture(scope="module")
def hf_models():
    cache: dict[str, torch.nn.Module] = {}

    def get(kind: str) -> torch.nn.Module:
        if kind not in cache:
            cache[kind] = tiny_moe_model(kind)
        return cache[kind]

    return get


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.inference_mode():
        return hf(torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_hub_names_prefill_and_decode_match_transformers(kind, moe_dir, hf_models):
    """``save_pretrained``'s per-expert names load; all prompts prefill in one step, then decode
    together, each step's logits equal to transformers' over the whole sequence."""
    path = moe_dir(kind)
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        names = list(f.keys())
    assert any(".experts.0." in n for n in names)  # the Hub's layout, one tensor per expert
    hf = hf_models(kind)
    model = load_model(path, torch.float32, torch.device("cpu"))
    runner = PagedRunner(model)
    prompts = _prompts()
    outputs = runner.step(list(enumerate(prompts)))
    for ours, prompt in zip(outputs, prompts, strict=True):
        torch.testing.assert_close(ours, _hf_logits(hf, prompt), atol=ATOL, rtol=0)
    sequences = [list(p) for p in prompts]
    nexts = [int(o[-1].argmax()) for o in outputs]
    for _ in range(4):
        for seq, token in zip(sequences, nexts, strict=True):
            seq.append(token)
        outputs = runner.step([(i, [t]) for i, t in enumerate(nexts)])
        for ours, seq in zip(outputs, sequences, strict=True):
            torch.testing.assert_close(ours[0], _hf_logits(hf, seq)[-1], atol=ATOL, rtol=0)
        nexts = [int(o[-1].argmax()) for o in outputs]


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_stacked_names_and_chunked_prefill(kind, moe_dir, hf_models):
    """transformers 5's stacked expert tensors (``mlp.experts.gate_up_proj``) load too; prompts
    prefilled in chunks of 1, 3, 8, 16 and 5 tokens sharing steps give the same logits."""
    path = moe_dir(kind, stacked=True)
    with safe_open(f"{path}/model.safetensors", "pt") as f:
        assert any(n.endswith("mlp.experts.gate_up_proj") for n in f.keys())
    model = load_model(path, torch.float32, torch.device("cpu"))
    prompts = _prompts()
    outputs = PagedRunner(model).run_chunked(prompts, chunk_sizes=[1, 3, 8, 16, 5])
    for ours, prompt in zip(outputs, prompts, strict=True):
        torch.testing.assert_close(ours, _hf_logits(hf_models(kind), prompt), atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_greedy_generation_matches_transformers_generate(kind, moe_dir, hf_models):
    """Several prompts at once, through the engine: continuous batching, chunked prefill with a
    budget of 16 tokens a step, prefix caching (the prompts share a 32-token prefix)."""
    generator = torch.Generator().manual_seed(5)
    prefix = torch.randint(3, 49152, (32,), generator=generator).tolist()
    tails = [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in (3, 9, 20)]
    prompts = [prefix + tail for tail in tails] + [prefix[:7]]
    llm = LLM(
        moe_dir(kind),
        dtype="float32",
        max_num_batched_tokens=16,
        max_num_seqs=4,
        enable_prefix_caching=True,
        kv_cache_memory=0.01,
    )
    assert llm.llm_engine.runner.cpu_stack is None  # MoE decode steps run module by module
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    requests = [{"prompt_token_ids": p} for p in prompts]
    outputs = llm.generate(requests, params, use_tqdm=False)
    hf = hf_models(kind)
    for prompt, output in zip(prompts, outputs, strict=True):
        with torch.inference_mode():
            ids = hf.generate(
                torch.tensor([prompt]), max_new_tokens=8, do_sample=False, min_new_tokens=8
            )
        assert output.outputs[0].token_ids == ids[0, len(prompt) :].tolist()
    again = llm.generate(requests, params, use_tqdm=False)  # from the cached prefix blocks
    assert [o.outputs[0].token_ids for o in again] == [o.outputs[0].token_ids for o in outputs]
    assert all(o.num_cached_tokens >= 32 for o in again[:3])


def test_unpacked_experts_match_transformers(moe_dir, hf_models, monkeypatch):
    """Without the C GEMM's panels (a GPU, or ``PAGEDSERVE_DISABLE_PREPACK=1``) the experts
    multiply through PyTorch, with the same results."""
    monkeypatch.setenv("PAGEDSERVE_DISABLE_PREPACK", "1")
    model = load_model(moe_dir("qwen2_moe"), torch.float32, torch.device("cpu"))
    assert all(not m.packed_gate_up for m in model.modules() if isinstance(m, FusedExperts))
    prompts = _prompts()
    outputs = PagedRunner(model).run_chunked(prompts, chunk_sizes=[1, 3, 8, 16, 5])
    for ours, prompt in zip(outputs, prompts, strict=True):
        expected = _hf_logits(hf_models("qwen2_moe"), prompt)
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_decode_stack_declines_moe_models(kind, moe_dir):
    """The C decode stack handles dense Llama layers only; it must never take an MoE model."""
    model = load_model(moe_dir(kind), torch.float32, torch.device("cpu"))
    PagedRunner(model)  # assigns the KV pools the stack would need
    assert CpuDecodeStack.build(model, 16) is None
    experts = [m for m in model.modules() if isinstance(m, FusedExperts)]
    assert experts and all(len(m.packed_gate_up) == m.num_experts for m in experts)


def test_missing_expert_is_refused(tmp_path, moe_dir):
    from safetensors.torch import load_file, save_file

    source = moe_dir("mixtral")
    tensors = load_file(f"{source}/model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w3.weight"]
    load_config(source).save_pretrained(tmp_path)
    save_file(tensors, tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match=r"lacks 1 weights: .*layers\.1\.mlp\.experts"):
        load_model(str(tmp_path), torch.float32, torch.device("cpu"))


def test_bfloat16_experts_stay_close_to_float32(moe_dir):
    """``--dtype bfloat16``: on an AVX512-BF16 CPU the experts multiply with bfloat16 panels
    (else PyTorch's bfloat16 modules run them). Given the same routing their outputs stay close
    to float32's; whole-model logits may differ more, bfloat16 moving near-tied router choices.
    """
    path = moe_dir("qwen2_moe")
    full = load_model(path, torch.float32, torch.device("cpu"))
    half = load_model(path, torch.bfloat16, torch.device("cpu"))
    if bf16_matmuls_in_float32(torch.bfloat16, "cpu"):
        experts = [m for m in half.modules() if isinstance(m, FusedExperts)]
        assert {p.dtype for m in experts for p in m.packed_gate_up + m.packed_down} == {
            torch.bfloat16
        }
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ids, weights = full.model.layers[0].mlp.route(x)
        expected = full.model.layers[0].mlp.experts(x, ids, weights)
        dtype = next(half.parameters()).dtype
        ours = half.model.layers[0].mlp.experts(x.to(dtype), ids, weights).float()
    torch.testing.assert_close(ours, expected, atol=0.02, rtol=0.02)
    llm = LLM(path, dtype="bfloat16", kv_cache_memory=0.01)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    out = llm.generate([{"prompt_token_ids": _prompts()[1]}], params, use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 6


@pytest.mark.parametrize("kind", MOE_KINDS)
def test_float16_modules_follow_the_reference(kind, moe_dir, hf_models):
    """16-bit modules (a GPU's dtypes; float16 here, which no CPU kernel takes) stay close to
    float32 transformers."""
    model = load_model(moe_dir(kind), torch.float16, torch.device("cpu"))
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    prompt = _prompts()[2]
    ours = PagedRunner(model).step([(0, prompt)])[0]
    theirs = _hf_logits(hf_models(kind), prompt)
    assert (ours - theirs).abs().max() < 0.02 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.9


def test_pooling_runner_embeds_the_last_token(moe_dir, hf_models):
    """``--runner pooling`` on an MoE causal LM: last-token pooling, normalised, as vLLM's."""
    llm = LLM(moe_dir("mixtral"), dtype="float32", runner="pooling", kv_cache_memory=0.01)
    prompt = _prompts()[1]
    (output,) = llm.embed([{"prompt_token_ids": prompt}], use_tqdm=False)
    with torch.inference_mode():
        hidden = hf_models("mixtral").model(torch.tensor([prompt])).last_hidden_state[0, -1]
    expected = torch.nn.functional.normalize(hidden, dim=-1)
    torch.testing.assert_close(torch.tensor(output.outputs.embedding), expected, atol=1e-4, rtol=0)


def test_lora_is_refused_for_moe(moe_dir):
    with pytest.raises(ValueError, match=r"--enable-lora.*Mixture-of-Experts.*Qwen3MoeForCausalLM"):
        LLM(moe_dir("qwen3_moe"), dtype="float32", enable_lora=True)


@pytest.mark.parametrize(("arch", "experts"), [("llama", 8), ("qwen3moe", 128), ("qwen2moe", 0)])
def test_gguf_of_an_moe_model_is_refused(arch, experts, tmp_path):
    path = tmp_path / "moe.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    if experts:
        writer.add_expert_count(experts)
    writer.add_tensor("token_embd.weight", torch.zeros(4, 8).numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=rf"GGUF files of Mixture-of-Experts .*{arch!r}"):
        load_config(str(path))


def test_ngram_speculative_decoding_keeps_greedy_tokens(moe_dir):
    """Draft checks run several rows of a request in one step through the experts."""
    pattern = torch.randint(3, 49152, (6,), generator=torch.Generator().manual_seed(7)).tolist()
    prompts = [{"prompt_token_ids": pattern * 4}, {"prompt_token_ids": _prompts()[2]}]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    ngram = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1}
    plain = LLM(moe_dir("mixtral"), dtype="float32", kv_cache_memory=0.01)
    spec = LLM(moe_dir("mixtral"), dtype="float32", kv_cache_memory=0.01, speculative_config=ngram)
    expected = [o.outputs[0].token_ids for o in plain.generate(prompts, params, use_tqdm=False)]
    assert [o.outputs[0].token_ids for o in spec.generate(prompts, params, use_tqdm=False)] == (
        expected
    )
    assert spec.llm_engine.get_stats().spec_decode_num_draft_tokens > 0  # drafts were checked
