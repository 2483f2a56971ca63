"""GGUF loading: the packaged SmolLM2 against transformers' own GGUF loader, and tiny GGUFs
written like llama.cpp's convert (permuted q/k, rope_freqs, quantized weights) against the HF
models they came from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter
from gguf.quants import dequantize
from tiny_models import PagedRunner, tiny_hf_model, write_tiny_gguf

from pagedserve import LLM, SamplingParams
from pagedserve.model.layers import linear as linear_module
from pagedserve.model.layers.linear import Linear
from pagedserve.model.layers.rotary import rope_parameters
from pagedserve.model.loader import bf16_matmuls_in_float32, load_config, load_model

CPU = torch.device("cpu")
Q = GGMLQuantizationType
SMOLLM2_PROMPTS = [
    [1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 3365, 3511, 308, 34519, 28, 7018, 411],
    [1, 4093, 198, 19556, 17, 2],
    [504, 3458, 282, 4649, 314, 216, 33, 41, 38, 41, 30, 378, 1789, 282, 260, 1345, 25, 7373],
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path):
    return load_model(smollm2_path, torch.float32, CPU)


def test_packaged_config(smollm2):
    config = smollm2.config
    assert config.architectures == ["LlamaForCausalLM"]
    assert (config.num_hidden_layers, config.hidden_size, config.intermediate_size) == (
        30,
        576,
        1536,
    )
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (9, 3, 64)
    assert (config.vocab_size, config.max_position_embeddings) == (49152, 8192)
    assert config.tie_word_embeddings and smollm2.lm_head is None
    # Its Q4_1 projections and Q8_0 embedding (the tied head) are kept for decode steps too.
    assert smollm2.packed_head_quantized is not None
    assert smollm2.model.layers[0].mlp.gate_up_proj.packed_quantized is not None
    assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 2)
    assert rope_parameters(config) == (100000.0, {"rope_type": "default"})


def test_packaged_model_matches_transformers(smollm2, hf_smollm2):
    reference = hf_smollm2
    ours = PagedRunner(smollm2).step(list(enumerate(SMOLLM2_PROMPTS)))
    for prompt, logits in zip(SMOLLM2_PROMPTS, ours, strict=True):
        with torch.inference_mode():
            expected = reference(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits, expected, atol=1e-3, rtol=0)
        assert torch.equal(logits.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize(
    "kind",
    [
        "llama",
        "qwen2",
        "qwen3",
        "llama_tied",
        "phi3",
        "phi3_partial",
        "phi4_mini",
        "gemma2_gguf",
        "gemma3_gguf",
    ],
)
def test_f32_gguf_matches_its_hf_model(kind, tmp_path):
    """Exact weights: name mapping, q/k un-permutation, llama3 rope via rope_freqs, tying;
    Phi-3's fused projections, sliding window, partial rotary and long-RoPE factor tensors;
    Gemma's norms stored plus one, its window pattern, score scale, caps and local RoPE."""
    hf = tiny_hf_model(kind)
    path = write_tiny_gguf(hf, tmp_path / "tiny.gguf")
    model = load_model(str(path), torch.float32, CPU)
    assert model.config.tie_word_embeddings == hf.config.tie_word_embeddings
    if kind.startswith("gemma"):
        for key in ("query_pre_attn_scalar", "sliding_window", "layer_types"):
            assert getattr(model.config, key) == getattr(hf.config, key), key
        for key in ("final_logit_softcapping", "attn_logit_softcapping"):
            assert getattr(model.config, key, None) == getattr(hf.config, key, None), key
    if kind.startswith("phi"):  # rotary share, long-RoPE factors: from keys and tensors
        (theta, scaling), (want_theta, want) = map(rope_parameters, (model.config, hf.config))
        assert theta == want_theta and scaling.keys() == want.keys()
        for key, value in want.items():
            assert scaling[key] == (pytest.approx(value) if isinstance(value, list) else value)
    prompts = [[5, 900, 17, 4000, 33, 2, 8] * 5, [44, 12]]
    if kind == "phi4_mini":  # past its 32 pretraining positions only the engine's rows go long
        prompts[0] = prompts[0][:32]
    ours = PagedRunner(model).run_chunked(prompts, chunk_sizes=[9, 1])
    for prompt, logits in zip(prompts, ours, strict=True):
        with torch.inference_mode():
            expected = hf(torch.tensor([prompt])).logits[0]
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


@pytest.fixture(scope="module")
def tiny_llama():
    hf = tiny_hf_model("llama")
    return hf, {name: p.detach().clone() for name, p in _fused(hf).items()}


def _fused(hf) -> dict[str, torch.Tensor]:
    """The HF model's weights in our layout (q/k/v and gate/up stacked)."""
    state = hf.state_dict()
    fused = {}
    for i in range(hf.config.num_hidden_layers):
        prefix = f"model.layers.{i}."
        fused[prefix + "self_attn.qkv_proj.weight"] = torch.cat(
            [state[prefix + f"self_attn.{p}_proj.weight"] for p in "qkv"]
        )
        fused[prefix + "mlp.gate_up_proj.weight"] = torch.cat(
            [state[prefix + f"mlp.{p}_proj.weight"] for p in ("gate", "up")]
        )
    for name, tensor in state.items():
        if not any(f"{p}_proj" in name for p in ("q", "k", "v", "gate", "up")):
            fused[name] = tensor
    return fused


@pytest.mark.parametrize(
    ("qtype", "tolerance"),
    [
        pytest.param(qtype, tolerance, id=qtype.name)
        for qtype, tolerance in [
            (Q.F16, 1e-3),
            (Q.BF16, 1e-2),
            (Q.Q8_0, 1e-2),
            (Q.Q5_0, 0.05),
            (Q.Q5_1, 0.05),
            (Q.Q4_0, 0.1),
            (Q.Q4_1, 0.1),
        ]
    ],
)
def test_quantized_gguf_weights_dequantize_to_the_originals(qtype, tolerance, tiny_llama, tmp_path):
    """Every weight comes back within the quantization error, relative to the tensor's largest
    entry (a mapping or permutation mistake would be off by the size of the weights)."""
    hf, expected = tiny_llama
    path = write_tiny_gguf(hf, tmp_path / f"tiny-{qtype.name}.gguf", qtype)
    model = load_model(str(path), torch.float32, CPU)
    params = dict(model.named_parameters())
    assert params.keys() == expected.keys()
    for name, want in expected.items():
        error = (params[name] - want).abs().max()
        assert error <= tolerance * want.abs().max(), f"{name}: error {error}"


@pytest.mark.parametrize(
    ("kind", "qtype"),
    [("llama", q) for q in (Q.Q4_1, Q.Q8_0, Q.Q4_0, Q.Q4_K, Q.Q6_K)]
    + [("phi3", Q.Q4_1), ("phi3", Q.Q8_0)],
    ids=lambda v: getattr(v, "name", v),
)
def test_quantized_projections_decode_through_their_blocks(
    kind, qtype, tiny_llama, tmp_path, monkeypatch
):
    """A GGUF's Q4_1, Q8_0, Q4_0, Q4_K or Q6_K projections (and tied head) keep their blocks
    (q/k rows unpermuted like their weights; Phi-3's fused q/k/v and gate/up whole) and decode
    steps multiply with them: generations equal the float32 panels' to the last bit. (gguf
    writes no K-quants: those are random blocks in the one matrix 256 inputs wide, ffn_down.)"""
    hf = tiny_llama[0] if kind == "llama" else tiny_hf_model(kind)
    raw = {}
    if qtype in (Q.Q4_K, Q.Q6_K):
        blocks = _random_k_blocks(qtype, hf.config.hidden_size, hf.config.intermediate_size)
        raw = {f"blk.{i}.ffn_down.weight": (blocks, qtype) for i in range(2)}
    path = write_tiny_gguf(
        hf,
        tmp_path / f"tiny-{qtype.name}.gguf",
        Q.F32 if raw else qtype,
        raw_tensors=raw,
        with_tokenizer=True,
    )
    llm = LLM(str(path), kv_cache_memory=0.01, device="cpu")  # the panels are a CPU path
    model = llm.llm_engine.model
    projections = [m for m in model.modules() if isinstance(m, Linear)]
    if raw:
        projections = [layer.mlp.down_proj for layer in model.model.layers]
    assert projections and all(m.packed_quantized is not None for m in projections)
    assert (model.lm_head is None) == (model.packed_head_quantized is not None)
    prompts = [{"prompt_token_ids": [5, 17, 900, 3, 11]}, {"prompt_token_ids": [1200, 7, 8]}]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3)

    def generate():
        return [
            (c.token_ids, [{t: lp.logprob for t, lp in step.items()} for step in c.logprobs])
            for c in (o.outputs[0] for o in llm.generate(prompts, params, use_tqdm=False))
        ]

    quantized = generate()
    monkeypatch.setattr(linear_module, "QUANTIZED_MAX_ROWS", 0)
    assert generate() == quantized


def _random_k_blocks(qtype: GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """Valid random K-quant bytes: random codes and sub-scales, small finite fp16 scales."""
    block, size = GGML_QUANT_SIZES[qtype]
    data = np.random.default_rng(0).integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    scale = np.frombuffer(np.float16(0.01).tobytes(), dtype=np.uint8)
    if qtype == Q.Q6_K:
        data[..., -2:] = scale  # d is the block's last field
    else:
        data[..., 0:2] = scale  # d, then dmin
        data[..., 2:4] = scale
    return data.reshape(rows, -1)


@pytest.mark.parametrize("qtype", [Q.Q4_K, Q.Q5_K, Q.Q6_K], ids=lambda q: q.name)
def test_k_quant_tensors_load(qtype, tiny_llama, tmp_path):
    """gguf cannot quantize K-types, so write raw blocks and check the loaded weight is their
    dequantization (the rows of ffn_down are 256 wide: one super-block)."""
    hf, _ = tiny_llama
    raw = _random_k_blocks(qtype, hf.config.hidden_size, hf.config.intermediate_size)
    path = write_tiny_gguf(
        hf, tmp_path / "tiny-k.gguf", raw_tensors={"blk.0.ffn_down.weight": (raw, qtype)}
    )
    model = load_model(str(path), torch.float32, CPU)
    loaded = model.model.layers[0].mlp.down_proj.weight
    assert torch.equal(loaded, torch.from_numpy(dequantize(raw, qtype)))


def test_gguf_in_bfloat16(tiny_llama, tmp_path):
    hf, _ = tiny_llama
    path = write_tiny_gguf(hf, tmp_path / "tiny-f16.gguf", Q.F16)
    model = load_model(str(path), torch.bfloat16, CPU)
    # float32 modules with bfloat16 matmuls where this CPU has AVX512-BF16
    modules = torch.float32 if bf16_matmuls_in_float32(torch.bfloat16, CPU) else torch.bfloat16
    assert {p.dtype for p in model.parameters()} == {modules}
    prompt = [5, 900, 17, 4000, 33, 2, 8] * 3
    logits = PagedRunner(model).step([(0, prompt)])[0]
    with torch.inference_mode():
        expected = hf(torch.tensor([prompt])).logits[0]
    assert logits.dtype == torch.float32
    assert (logits - expected).abs().max() < 0.1 * expected.abs().max()


def test_unsupported_gguf_architecture(tmp_path):
    path = tmp_path / "other.gguf"
    writer = GGUFWriter(str(path), "gpt2")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(
        ValueError, match="unsupported GGUF architecture 'gpt2'.*llama, qwen2, qwen3"
    ):
        load_config(str(path))
