"""Gemma 1, Granite and OLMo 2 (tests/tiny_dense.py) from their safetensors checkpoints: logits
equal transformers' in prefill and decode steps, greedy generations through the engine (and the
server) equal transformers' ``generate``, and the per-model paths (the CPU decode stack, GGUF,
16-bit, LoRA, the pooling runner) either work or refuse clearly."""

from __future__ import annotations

import json

import pytest
import torch
from gguf import GGUFWriter
from server_utils import MODEL_NAME, ServerProcess
from tiny_dense import DENSE_KINDS, dense_hf_model
from tiny_models import DEVICES, PagedRunner, write_lora_adapter
from transformers import AutoModelForCausalLM

from pagedserve import LLM, LoRARequest, SamplingParams
from pagedserve.model.layers.attention import Attention
from pagedserve.model.loader import bf16_matmuls_in_float32, load_model
from pagedserve.worker.cpu_decode import CpuDecodeStack

ATOL = 1e-4
VOCAB = 49152
# A shared prefix of 20 tokens (prefix caching), then tails of different lengths.
_PREFIX = [3 + (11 * j) % 5000 for j in range(20)]
PROMPTS = [_PREFIX + [7 + (13 * i + 5 * j) % 9000 for j in range(3 + 9 * i)] for i in range(4)]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def hf_model():
    made: dict[str, torch.nn.Module] = {}

    def make(kind: str) -> torch.nn.Module:
        if kind not in made:
            made[kind] = dense_hf_model(kind)
        return made[kind]

    return make


def _random_prompts() -> list[list[int]]:
    generator = torch.Generator().manual_seed(1)
    lengths = [5, 17, 40, 1, 33]  # ragged; some cross block boundaries (block_size 16)
    return [torch.randint(3, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def _reference(hf: torch.nn.Module, prompts: list[list[int]]) -> list[torch.Tensor]:
    with torch.inference_mode():
        return [hf(torch.tensor([p])).logits[0].float() for p in prompts]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_prefill_then_decode_steps_match_transformers(kind, device, dense_dir, hf_model):
    """Each prompt's first tokens in one prefill step, shared by every prompt, then its last
    six one a step (decodes, batched together): every position's logits are transformers'."""
    model = load_model(dense_dir(kind), torch.float32, torch.device(device))
    runner = PagedRunner(model)
    prompts = [p for p in _random_prompts() if len(p) > 6]
    got = [[logits] for logits in runner.step([(i, p[:-6]) for i, p in enumerate(prompts)])]
    for k in range(6, 0, -1):
        step = runner.step([(i, [p[-k]]) for i, p in enumerate(prompts)])
        for logits, parts in zip(step, got, strict=True):
            parts.append(logits)
    for parts, theirs in zip(got, _reference(hf_model(kind), prompts), strict=True):
        torch.testing.assert_close(torch.cat(parts), theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["fast", "reference"])
@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_chunks_and_last_rows_match_transformers(kind, backend, device, dense_dir, hf_model):
    """Chunked prefill mixed with decode-shaped steps, the last layer computing only each
    chunk's last row (as the engine asks for it), through either attention backend."""
    model = load_model(dense_dir(kind), torch.float32, torch.device(device))
    for layer in model.modules():
        if isinstance(layer, Attention):
            layer.backend = backend
    sizes = [1, 3, 8, 16, 5]
    prompts = _random_prompts()
    outputs = PagedRunner(model).run_chunked(prompts, sizes, output_last=True)
    references = _reference(hf_model(kind), prompts)
    for ours, theirs, size in zip(outputs, references, sizes, strict=True):
        last_of_chunks = [
            min(end, len(theirs)) - 1 for end in range(size, len(theirs) + size, size)
        ]
        torch.testing.assert_close(ours, theirs[last_of_chunks], atol=ATOL, rtol=0)


def _hf_generate(hf: torch.nn.Module, prompt: list[int]) -> list[int]:
    with torch.inference_mode():
        out = hf.generate(
            torch.tensor([prompt]), max_new_tokens=MAX_TOKENS, do_sample=False, eos_token_id=None
        )
    return out[0, len(prompt) :].tolist()


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_greedy_generations_equal_transformers_generate(kind, dense_dir, hf_model):
    """Four prompts at once (continuous batching), prefilled 16 tokens a step (chunked
    prefill), then again from the prefix cache: transformers' greedy tokens each time."""
    llm = LLM(
        dense_dir(kind),
        device="cpu",
        dtype="float32",
        kv_cache_memory=0.02,
        max_num_batched_tokens=16,
        enable_prefix_caching=True,
    )
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    want = [_hf_generate(hf_model(kind), p) for p in PROMPTS]
    for run in range(2):
        outputs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params, use_tqdm=False)
        assert [list(o.outputs[0].token_ids) for o in outputs] == want
        if run:  # the shared prefix's first block, at least, came from the cache
            assert min(o.num_cached_tokens for o in outputs) >= 16


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_the_cpu_decode_stack_takes_them(kind, dense_dir):
    """The C decode stack runs Gemma 1's, Granite's and OLMo 2's layers (their steps through it
    equal the modules': tests/test_cpu_decode_stack_dense.py)."""
    model = load_model(dense_dir(kind), torch.float32, torch.device("cpu"))
    PagedRunner(model)  # assigns the KV pools
    assert CpuDecodeStack.build(model, block_size=16) is not None
    llm = LLM(dense_dir(kind), device="cpu", dtype="float32", kv_cache_memory=0.02)
    assert llm.llm_engine.runner.cpu_stack is not None


@pytest.mark.parametrize("arch", ["gemma", "granite", "olmo2"])
def test_a_gguf_of_these_architectures_is_refused(arch, tmp_path, dense_dir):
    """transformers reads no GGUF of them (so there is no reference to check one against): the
    file is refused, naming its architecture and the supported ones (its tokenizer taken from
    a directory, as a GGUF's own would load)."""
    path = tmp_path / f"{arch}.gguf"
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match=f"unsupported GGUF architecture '{arch}'.*gemma2"):
        LLM(str(path), tokenizer=dense_dir("granite"), device="cpu")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_half_precision_follows_the_reference(kind, dtype, dense_dir):
    """In 16-bit (on a CPU with AVX512-BF16, bfloat16 is float32 modules with bfloat16 panels)
    the logits stay close to float32 transformers' and greedy tokens mostly agree."""
    path = dense_dir(kind)
    model = load_model(path, dtype, torch.device("cpu"))
    modules = torch.float32 if bf16_matmuls_in_float32(dtype, "cpu") else dtype
    assert all(p.dtype == modules for p in model.parameters())
    prompt = _random_prompts()[2]
    ours = PagedRunner(model).step([(0, prompt)])[0]
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    with torch.inference_mode():
        theirs = hf(torch.tensor([prompt])).logits[0]
    assert (ours - theirs).abs().max() < 0.1 * theirs.abs().max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).float().mean() > 0.8


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_lora_adapters_equal_the_merged_model(kind, tmp_path, dense_dir, hf_model, monkeypatch):
    """An adapter on every projection: greedy tokens of transformers' model with it merged in
    (Granite scales the adapted projections' outputs by its residual multiplier; OLMo 2 norms
    the adapted q and k). Granite's and OLMo 2's decode steps add the adapter's terms in the C
    decode stack, Gemma's (GeGLU) run module by module."""
    adapter_steps = []
    run = CpuDecodeStack.run

    def counting(self, input_ids, positions, meta, adapters=None):
        adapter_steps.append(adapters is not None)
        return run(self, input_ids, positions, meta, adapters)

    monkeypatch.setattr(CpuDecodeStack, "run", counting)
    merged = write_lora_adapter(tmp_path / "adapter", kind, 1, model=dense_hf_model(kind))
    llm = LLM(dense_dir(kind), device="cpu", dtype="float32", enable_lora=True)
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    lora = LoRARequest("adapter", 1, str(tmp_path / "adapter"))
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    outputs = llm.generate(prompts, params, use_tqdm=False, lora_request=lora)
    want = [_hf_generate(merged, p) for p in PROMPTS]
    assert [list(o.outputs[0].token_ids) for o in outputs] == want
    assert want != [_hf_generate(hf_model(kind), p) for p in PROMPTS]  # the adapter matters
    takes_adapters = kind != "gemma"
    assert all(adapter_steps) and bool(adapter_steps) == takes_adapters


@pytest.mark.parametrize("kind", DENSE_KINDS)
def test_pooling_runner_embeds_the_last_hidden_state(kind, dense_dir, hf_model):
    """``--runner pooling``: the normalised final hidden state of each prompt's last token."""
    llm = LLM(dense_dir(kind), device="cpu", dtype="float32", runner="pooling")
    outputs = llm.embed([{"prompt_token_ids": p} for p in PROMPTS], use_tqdm=False)
    decoder = hf_model(kind).model
    for prompt, out in zip(PROMPTS, outputs, strict=True):
        with torch.inference_mode():
            hidden = decoder(torch.tensor([prompt])).last_hidden_state[0, -1]
        want = torch.nn.functional.normalize(hidden, dim=0)
        torch.testing.assert_close(torch.tensor(out.outputs.embedding), want, atol=2e-5, rtol=0)


@pytest.fixture(scope="module")
def granite_server(dense_dir):
    srv = ServerProcess(
        [dense_dir("granite"), "--served-model-name", MODEL_NAME, "--dtype", "float32"]
    ).wait_ready()
    yield srv
    srv.close()


def test_openai_client_completions_of_granite(granite_server, hf_model, smollm2_tokenizer):
    """Through the server (the ``openai`` client), a batch of token-id prompts completes as
    transformers' greedy ``generate`` does, streamed or not."""
    client = granite_server.client()
    want = [smollm2_tokenizer.decode(_hf_generate(hf_model("granite"), p)) for p in PROMPTS]
    args = {"model": MODEL_NAME, "max_tokens": MAX_TOKENS, "temperature": 0}
    batch = client.completions.create(prompt=PROMPTS, **args, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == want
    assert batch.usage.completion_tokens == MAX_TOKENS * len(PROMPTS)
    stream = client.completions.create(
        prompt=PROMPTS[0], stream=True, **args, extra_body={"ignore_eos": True}
    )
    assert "".join(chunk.choices[0].text for chunk in stream if chunk.choices) == want[0]


def test_gemma_1_configs_of_the_first_release_load(tmp_path, hf_model):
    """Gemma 1's first checkpoints say ``"hidden_act": "gelu"`` and mean the tanh approximation,
    as transformers reads it (the activation is taken from the config as transformers leaves
    it)."""
    hf_model("gemma").save_pretrained(tmp_path)
    config_file = tmp_path / "config.json"
    config = json.loads(config_file.read_text())
    config_file.write_text(json.dumps({**config, "hidden_act": "gelu"}))
    model = load_model(str(tmp_path), torch.float32, torch.device("cpu"))
    prompt = _random_prompts()[1]
    ours = PagedRunner(model).step([(0, prompt)])[0]
    torch.testing.assert_close(ours, _reference(hf_model("gemma"), [prompt])[0], atol=ATOL, rtol=0)
