"""Our model's logits equal transformers' on the same weights, however the tokens are batched."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import DEVICES, PagedRunner, tiny_hf_model
from transformers import AutoModelForCausalLM, Gemma3Config

from pagedserve import LLM, SamplingParams
from pagedserve.model.layers.attention import Attention
from pagedserve.model.loader import bf16_matmuls_in_float32, load_model
from pagedserve.model.registry import SUPPORTED_ARCHITECTURES

KINDS = [
    "llama",
    "qwen2",
    "qwen3",
    "llama_tied",
    "mistral",
    "phi3",
    "phi3_partial",
    "qwen2_window",
    "gemma2",
    "gemma3",
]
ATOL = 1e-4
VOCAB = 49152


def _prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 17, 40, 1, 33]  # ragged; some cross block boundaries (block_size 16)
    return [torch.randint(3, 49152, (n,), generator=generator).tolist() for n in lengths]


@pytest.fixture(scope="module")
def reference():
    """HF logits of every prompt, each run alone over its whole length."""
    cache: dict[str, list[torch.Tensor]] = {}

    def logits(kind: str) -> list[torch.Tensor]:
        if kind not in cache:
            hf = tiny_hf_model(kind)
            with torch.inference_mode():
                cache[kind] = [hf(torch.tensor([p])).logits[0].float() for p in _prompts()]
        return cache[kind]

    return logits


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_whole_prompts_in_one_step(kind, device, tiny_model_dir, reference):
    model = load_model(tiny_model_dir(kind), torch.float32, torch.device(device))
    runner = PagedRunner(model)
    prompts = _prompts()
    outputs = runner.step(list(enumerate(prompts)))
    for ours, theirs in zip(outputs, reference(kind), strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("kind", KINDS)
def test_last_layer_computes_only_the_rows_that_leave(
    kind, backend, device, tiny_model_dir, reference
):
    """With output rows set, the last layer runs only each chunk's last token (and still stores
    every token's K/V, or the later chunks would see a hole)."""
    model = load_model(tiny_model_dir(kind), torch.float32, torch.device(device))
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.backend = backend
    sizes = [1, 3, 8, 16, 5]
    outputs = PagedRunner(model).run_chunked(_prompts(), sizes, output_last=True)
    for ours, theirs, size in zip(outputs, reference(kind), sizes, strict=True):
        last_of_chunks = [
            min(end, len(theirs)) - 1 for end in range(size, len(theirs) + size, size)
        ]
        torch.testing.assert_close(ours, theirs[last_of_chunks], atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", KINDS)
def test_chunked_prefill_mixed_with_decodes(kind, device, tiny_model_dir, reference):
    """Prompts advance 1 (a decode-shaped step), 3, 8, 16 or 5 tokens at a time, sharing steps."""
    model = load_model(tiny_model_dir(kind), torch.float32, torch.device(device))
    outputs = PagedRunner(model).run_chunked(_prompts(), chunk_sizes=[1, 3, 8, 16, 5])
    for ours, theirs in zip(outputs, reference(kind), strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_sharded_safetensors_directory(tiny_model_dir, reference):
    path = tiny_model_dir("llama_sharded")
    model = load_model(path, torch.float32, torch.device("cpu"))
    outputs = PagedRunner(model).step(list(enumerate(_prompts())))
    for ours, theirs in zip(outputs, reference("llama"), strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("prefix", ["language_model.model.", "model.language_model."])
def test_text_half_of_a_multimodal_gemma3_checkpoint(prefix, tmp_path, reference):
    """Gemma3ForConditionalGeneration (Gemma 3 4B and up), as the Hub's files name its tensors
    and as transformers 5 does: the text model loads, the vision tower's tensors are skipped."""
    hf = tiny_hf_model("gemma3")
    tensors = {
        name.replace("model.", prefix, 1): t.contiguous()
        for name, t in hf.state_dict().items()
        if name != "lm_head.weight"
    }
    outer = "" if prefix.startswith("language_model") else "model."
    tensors[outer + "vision_tower.vision_model.post_layernorm.weight"] = torch.ones(8)
    tensors[outer + "multi_modal_projector.mm_input_projection_weight"] = torch.ones(8, 64)
    save_file(tensors, tmp_path / "model.safetensors")
    config = Gemma3Config(
        text_config=hf.config.to_dict(), architectures=["Gemma3ForConditionalGeneration"]
    )
    config.save_pretrained(tmp_path)
    model = load_model(str(tmp_path), torch.float32, torch.device("cpu"))
    assert model.config.num_hidden_layers == 2
    outputs = PagedRunner(model).step(list(enumerate(_prompts())))
    for ours, theirs in zip(outputs, reference("gemma3"), strict=True):
        torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("length", [20, 40])
def test_longrope_rows_are_those_transformers_picks(length, tiny_model_dir):
    """Phi-4-mini's layout (half of each head rotates, long RoPE): a prompt within the
    pretraining context (32 positions) rotates with the short factors, a longer one with the
    long factors throughout, as transformers does for a prompt run whole. Checked through the
    engine, which picks the rows for each request, by the prompt's logprobs."""
    generator = torch.Generator().manual_seed(2)
    prompt = torch.randint(3, VOCAB, (length,), generator=generator).tolist()
    llm = LLM(tiny_model_dir("phi4_mini"), device="cpu", kv_cache_memory=0.02)
    params = SamplingParams(max_tokens=1, prompt_logprobs=0)
    (out,) = llm.generate([{"prompt_token_ids": prompt}], params, use_tqdm=False)
    with torch.inference_mode():
        logprobs = tiny_hf_model("phi4_mini")(torch.tensor([prompt])).logits[0].log_softmax(-1)
    ours = [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], prompt[1:], strict=True)]
    theirs = [logprobs[i, t].item() for i, t in enumerate(prompt[1:])]
    assert ours == pytest.approx(theirs, abs=1e-4)


def test_config_is_the_transformers_config(tiny_model_dir):
    model = load_model(tiny_model_dir("llama"), torch.float32, torch.device("cpu"))
    config = model.config
    assert config.architectures[0] in SUPPORTED_ARCHITECTURES
    assert (config.num_key_value_heads, config.head_dim, config.vocab_size) == (2, 16, 49152)
    assert config.max_position_embeddings == 256


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["llama", "gemma2", "gemma3"])
def test_half_precision_follows_the_reference(kind, dtype, device, tiny_model_dir):
    """In 16-bit the logits stay close to float32 transformers and greedy tokens mostly agree."""
    path = tiny_model_dir(kind)
    model = load_model(path, dtype, torch.device(device))
    # float32 modules with bfloat16 matmuls on a CPU with AVX512-BF16
    modules = torch.float32 if bf16_matmuls_in_float32(dtype, device) else dtype
    assert all(p.dtype == modules for p in model.parameters())
    prompt = _prompts()[2]
    ours = PagedRunner(model).step([(0, prompt)])[0]
    hf = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    with torch.inference_mode():
        theirs = hf(torch.tensor([prompt])).logits[0]
    assert ours.dtype == torch.float32
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.8
