"""Tiny random models for tests: HF directories, GGUF files written from them, and a driver
that runs our model over a paged KV cache the way the engine does.

The vocabulary is SmolLM2's (49152 tokens) so the packaged tokenizer can be saved alongside and
token ids line up; everything else is small so a forward pass takes milliseconds.
"""

from __future__ import annotations

import json
import shutil
from functools import partial
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType
from gguf.quants import quantize
from safetensors.torch import save_file
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from pagedserve.model.gguf_loader import metadata, open_gguf
from pagedserve.model.layers.attention import Attention, AttentionMetadata
from pagedserve.model.layers.rotary import inverse_frequencies, rope_parameters
from pagedserve.model_path import packaged_model_path

VOCAB_SIZE = 49152
# The devices tests that take a ``device`` parameter run on: the CPU, and the GPU where there is
# one (so a GPU machine checks the CUDA path against the same references).
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]
_SIZES = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=256,  # a multiple of 256, so ffn_down rows can hold K-quant blocks
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 32,
}


def tiny_config(kind: str) -> PretrainedConfig:
    """``llama`` (GQA, llama3 rope scaling), ``llama_tied`` (tied embeddings, plain rope),
    ``llama_sharded`` (as ``llama``; written in shards), ``qwen2`` (q/k/v bias), ``qwen3``
    (per-head q/k norms, a head_dim twice hidden / heads, tied embeddings), ``mistral`` (a
    sliding window of 8 positions on every layer), ``phi3`` (q/k/v and gate/up fused in the
    checkpoint, the same window), ``phi3_partial`` (half of each head rotates),
    ``phi4_mini`` (that, with long RoPE over a pretraining context of 32), ``qwen2_window`` (one on the second layer
    only), ``gemma2`` (a window on the first layer, query_pre_attn_scalar, soft-capped scores
    and logits, caps small enough to matter) or ``gemma3`` (a window on the first layer, each
    layer type its own RoPE, q/k norms, query_pre_attn_scalar, soft-capped logits);
    ``gemma2_gguf`` and ``gemma3_gguf`` are Gemma 2 and 3 as llama.cpp's GGUF files describe
    them (scores scaled by the head size; Gemma 3 with six layers, the last one global)."""
    if kind in ("llama", "llama_sharded"):
        return LlamaConfig(**_SIZES, rope_theta=500000.0, rope_scaling=dict(LLAMA3_SCALING))
    if kind == "llama_tied":
        return LlamaConfig(**_SIZES, tie_word_embeddings=True)
    if kind == "qwen2":
        return Qwen2Config(**_SIZES, rope_theta=1000000.0, tie_word_embeddings=False)
    if kind == "phi3":
        return Phi3Config(**_SIZES, sliding_window=8)
    if kind in ("phi3_partial", "phi4_mini"):
        rope: dict = {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
        if kind == "phi4_mini":  # a pretraining context of 32 positions, stretched to 256
            rope.update(
                rope_type="longrope",
                short_factor=[1.0, 1.1, 1.3, 1.6],
                long_factor=[1.5, 2.5, 4.0, 8.0],
                original_max_position_embeddings=32,
            )
        return Phi3Config(**_SIZES, rope_parameters=rope, original_max_position_embeddings=32)
    if kind == "mistral":
        return MistralConfig(**_SIZES, sliding_window=8)
    if kind == "qwen2_window":
        return Qwen2Config(**_SIZES, use_sliding_window=True, sliding_window=8, max_window_layers=1)
    if kind == "gemma2":
        return Gemma2Config(
            **_SIZES,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
            # SDPA cannot soft-cap: some transformers versions pick it anyway and drop the cap.
            attn_implementation="eager",
        )
    if kind == "gemma2_gguf":  # what a GGUF can say: scores scaled by the head size
        return Gemma2Config(
            **_SIZES,
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            attn_logit_softcapping=2.0,
            final_logit_softcapping=5.0,
            attn_implementation="eager",
        )
    if kind == "gemma3_gguf":  # llama.cpp's Gemma 3: five sliding layers in six
        return Gemma3TextConfig(
            **{**_SIZES, "num_hidden_layers": 6},
            head_dim=32,
            query_pre_attn_scalar=32,
            sliding_window=8,
            layer_types=["sliding_attention"] * 5 + ["full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
            final_logit_softcapping=30.0,
        )
    if kind == "gemma3":
        return Gemma3TextConfig(
            **_SIZES,
            head_dim=32,
            query_pre_attn_scalar=24,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1e6},
            },
            final_logit_softcapping=30.0,
        )
    if kind == "qwen3":
        return Qwen3Config(**_SIZES, head_dim=32, rope_theta=1000000.0, tie_word_embeddings=True)
    raise ValueError(f"unknown tiny model kind {kind!r}")


def tiny_hf_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A transformers model of ``kind`` with every weight random (norms near 1, biases non-zero)
    so a wrong mapping of any tensor shows in the logits."""
    config = tiny_config(kind)
    model_class = {
        "gemma2": Gemma2ForCausalLM,
        "gemma2_gguf": Gemma2ForCausalLM,
        "gemma3": Gemma3ForCausalLM,
        "gemma3_gguf": Gemma3ForCausalLM,
        "mistral": MistralForCausalLM,
        "phi3": Phi3ForCausalLM,
        "phi3_partial": Phi3ForCausalLM,
        "phi4_mini": Phi3ForCausalLM,
        "qwen2": Qwen2ForCausalLM,
        "qwen2_window": Qwen2ForCausalLM,
        "qwen3": Qwen3ForCausalLM,
    }.get(kind, LlamaForCausalLM)
    torch.manual_seed(seed)
    model = model_class(config).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def write_tiny_model(path: Path, kind: str, tokenizer=None, seed: int = 0) -> Path:
    """Save a tiny HF model directory (config.json, safetensors, tokenizer if given)."""
    model = tiny_hf_model(kind, seed)
    shard = "2MB" if kind == "llama_sharded" else "1GB"
    model.save_pretrained(path, max_shard_size=shard)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def _hf_to_gguf_name(name: str, arch: str) -> str:
    table = {
        "model.embed_tokens": "token_embd",
        "model.norm": "output_norm",
        "lm_head": "output",
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "self_attn.q_norm": "attn_q_norm",
        "self_attn.k_norm": "attn_k_norm",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
        "self_attn.qkv_proj": "attn_qkv",  # Phi-3's fused projections
        "mlp.gate_up_proj": "ffn_up",
    }
    if arch in ("gemma2", "gemma3"):
        table |= {
            "post_attention_layernorm": "post_attention_norm",
            "pre_feedforward_layernorm": "ffn_norm",
            "post_feedforward_layernorm": "post_ffw_norm",
        }
    base, _, suffix = name.rpartition(".")
    if base.startswith("model.layers."):
        _, _, index, rest = base.split(".", 3)
        return f"blk.{index}.{table[rest]}.{suffix}"
    return f"{table[base]}.{suffix}"


def _permute_rotary(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """llama.cpp's convert-time reordering of Llama q/k rows (halves -> interleaved pairs)."""
    half = weight.shape[0] // num_heads // 2
    return (
        weight.reshape(num_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)
    )


def _copy_tokenizer_metadata(writer: GGUFWriter) -> None:
    reader = open_gguf(str(packaged_model_path()))
    writer.add_tokenizer_model(metadata(reader, "tokenizer.ggml.model"))
    writer.add_tokenizer_pre(metadata(reader, "tokenizer.ggml.pre"))
    writer.add_token_list(metadata(reader, "tokenizer.ggml.tokens"))
    writer.add_token_types(metadata(reader, "tokenizer.ggml.token_type"))
    writer.add_token_merges(metadata(reader, "tokenizer.ggml.merges"))
    writer.add_chat_template(metadata(reader, "tokenizer.chat_template"))
    writer.add_add_bos_token(False)
    writer.add_add_space_prefix(metadata(reader, "tokenizer.ggml.add_space_prefix"))
    writer.add_unk_token_id(metadata(reader, "tokenizer.ggml.unknown_token_id"))


def write_tiny_gguf(
    model: PreTrainedModel,
    path: Path,
    qtype: GGMLQuantizationType = GGMLQuantizationType.F32,
    raw_tensors: dict[str, tuple[np.ndarray, GGMLQuantizationType]] | None = None,
    with_tokenizer: bool = False,
) -> Path:
    """Write ``model`` as llama.cpp's convert would: GGUF names, permuted Llama q/k, llama3
    scaling as ``rope_freqs``, 2-D weights in ``qtype`` where their rows fit its blocks (F32
    otherwise, as llama.cpp falls back). ``raw_tensors`` replaces named tensors with given bytes.
    ``with_tokenizer`` copies SmolLM2's tokenizer metadata (a complete model for engine tests,
    but its 100k strings make writing and reading the file take seconds).
    """
    config = model.config
    arch = {"gemma3_text": "gemma3"}.get(config.model_type, config.model_type)
    if arch not in ("qwen2", "qwen3", "phi3", "gemma2", "gemma3"):
        arch = "llama"
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    if arch == "gemma3":  # the global layers' RoPE (llama.cpp knows the sliding layers')
        full = config.rope_parameters["full_attention"]
        theta, scaling = full["rope_theta"], full
        if full["rope_type"] == "linear":
            writer.add_rope_scaling_type(RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(full["factor"])
    else:
        theta, scaling = rope_parameters(config)
    if arch in ("gemma2", "gemma3"):
        writer.add_sliding_window(config.sliding_window)
        if config.final_logit_softcapping is not None:
            writer.add_final_logit_softcapping(config.final_logit_softcapping)
        if arch == "gemma2":
            writer.add_attn_logit_softcapping(config.attn_logit_softcapping)
    if arch == "phi3":  # as llama.cpp's convert writes Phi-3: no key length, a window (0: none)
        rotary = int(head_dim * scaling.get("partial_rotary_factor", 1.0))
        writer.add_rope_dimension_count(rotary)
        writer.add_sliding_window(config.sliding_window or 0)
        if config.original_max_position_embeddings:
            writer.add_rope_scaling_orig_ctx_len(config.original_max_position_embeddings)
        if scaling["rope_type"] == "longrope":
            for kind in ("long", "short"):
                factors = np.array(scaling[f"{kind}_factor"], dtype=np.float32)
                writer.add_tensor(f"rope_factors_{kind}.weight", factors)
    else:
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_freq_base(theta)
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)
    if with_tokenizer:
        _copy_tokenizer_metadata(writer)

    if scaling["rope_type"] == "llama3":
        plain = inverse_frequencies(head_dim, theta, {"rope_type": "default"})
        factors = plain / inverse_frequencies(head_dim, theta, scaling)
        writer.add_tensor("rope_freqs.weight", factors.numpy())
    block = 256 if qtype.name.endswith("_K") else 32
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = _hf_to_gguf_name(name, arch)
        array = tensor.float().numpy()
        if arch in ("gemma2", "gemma3") and gguf_name.endswith("norm.weight"):
            array = array + 1  # as llama.cpp's convert stores Gemma's norms
        if arch == "llama" and ".attn_q." in gguf_name:
            array = _permute_rotary(array, config.num_attention_heads)
        elif arch == "llama" and ".attn_k." in gguf_name:
            array = _permute_rotary(array, config.num_key_value_heads)
        if raw_tensors and gguf_name in raw_tensors:
            data, raw_type = raw_tensors[gguf_name]
            writer.add_tensor(gguf_name, data, raw_dtype=raw_type)
        elif array.ndim == 2 and qtype != GGMLQuantizationType.F32 and array.shape[1] % block == 0:
            writer.add_tensor(gguf_name, quantize(array, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name, np.ascontiguousarray(array))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


class PagedRunner:
    """Runs our model step by step over a paged KV cache, as the engine's model runner does.

    Blocks are handed out from the end of the pool backwards, so a sequence's blocks are not
    contiguous and not in order: the block tables are really exercised.
    """

    def __init__(self, model: torch.nn.Module, num_blocks: int = 64, block_size: int = 16):
        self.model = model
        self.block_size = block_size
        config = model.config
        head_dim = (
            getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        )
        weight = next(model.parameters())
        self.device = weight.device
        shape = (num_blocks, block_size, config.num_key_value_heads, head_dim)
        for layer in (m for m in model.modules() if isinstance(m, Attention)):
            layer.k_cache = torch.zeros(shape, dtype=weight.dtype, device=self.device)
            layer.v_cache = torch.zeros(shape, dtype=weight.dtype, device=self.device)
        self.free = list(range(num_blocks))
        self.blocks: dict[int, list[int]] = {}
        self.lengths: dict[int, int] = {}

    @torch.inference_mode()
    def step(
        self, chunks: list[tuple[int, list[int]]], output_last: bool = False
    ) -> list[torch.Tensor]:
        """Feed each ``(sequence id, new token ids)`` in one flattened forward; returns the
        float32 logits ``[len(new ids), vocab]`` of every chunk, or with ``output_last`` only
        ``[1, vocab]`` for its last token, asked of the model as the engine does (its last layer
        then computes only those rows)."""
        ids, positions, slots, starts, seq_lens, tables = [], [], [], [0], [], []
        for seq, tokens in chunks:
            start = self.lengths.get(seq, 0)
            end = start + len(tokens)
            table = self.blocks.setdefault(seq, [])
            while len(table) * self.block_size < end:
                table.append(self.free.pop())
            pos = list(range(start, end))
            ids += tokens
            positions += pos
            slots += [
                table[p // self.block_size] * self.block_size + p % self.block_size for p in pos
            ]
            starts.append(starts[-1] + len(tokens))
            seq_lens.append(end)
            tables.append(table)
            self.lengths[seq] = end
        width = max(len(t) for t in tables)
        tensor = partial(torch.tensor, device=self.device)
        meta = AttentionMetadata(
            slot_mapping=tensor(slots),
            query_start_loc=tensor(starts, dtype=torch.int32),
            seq_lens=tensor(seq_lens, dtype=torch.int32),
            block_tables=tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
            query_start_loc_cpu=starts,
            seq_lens_cpu=seq_lens,
            max_query_len=max(len(t) for _, t in chunks),
            max_seq_len=max(seq_lens),
            block_size=self.block_size,
        )
        meta.split_decodes()
        if output_last:
            meta.output_rows = tensor(starts[1:]) - 1
            meta.output_reqs = torch.arange(len(chunks), device=self.device)
        hidden = self.model(tensor(ids), tensor(positions), meta)
        logits = self.model.compute_logits(hidden).float().cpu()
        return list(logits.split([1 if output_last else len(t) for _, t in chunks]))

    def run_chunked(
        self, prompts: list[list[int]], chunk_sizes: list[int], output_last: bool = False
    ) -> list[torch.Tensor]:
        """Prefill every prompt in chunks (prompt ``i`` takes ``chunk_sizes[i]`` tokens a step),
        all prompts sharing each step; returns each prompt's logits for all its positions (with
        ``output_last``, for the last position of each chunk)."""
        done = [0] * len(prompts)
        out: list[list[torch.Tensor]] = [[] for _ in prompts]
        while any(d < len(p) for d, p in zip(done, prompts, strict=True)):
            chunks, owners = [], []
            for i, prompt in enumerate(prompts):
                if done[i] < len(prompt):
                    piece = prompt[done[i] : done[i] + chunk_sizes[i]]
                    chunks.append((i, piece))
                    owners.append(i)
                    done[i] += len(piece)
            for i, logits in zip(owners, self.step(chunks, output_last), strict=True):
                out[i].append(logits)
        return [torch.cat(parts) for parts in out]


def sentence_transformers_dir(base: str, dest: Path, mode: str, normalize: bool = True) -> str:
    """``base`` as a sentence-transformers model: Transformer, Pooling (``mode``), Normalize."""
    shutil.copytree(base, dest)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
    ]
    if normalize:
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}
        )  # fmt: skip
    (dest / "modules.json").write_text(json.dumps(modules))
    (dest / "1_Pooling").mkdir()
    flags = {
        f"pooling_mode_{key}": key == mode
        for key in ("cls_token", "mean_tokens", "lasttoken", "max_tokens")
    }
    (dest / "1_Pooling" / "config.json").write_text(json.dumps(flags))
    return str(dest)


LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def write_lora_adapter(
    path: Path,
    kind: str,
    seed: int,
    rank: int = 4,
    alpha: float = 8.0,
    rslora: bool = False,
    model: PreTrainedModel | None = None,
) -> PreTrainedModel:
    """A PEFT LoRA adapter directory for the tiny ``kind`` model (or for ``model``, given), on
    every projection, with random A and B; returns the base model with the adapter merged in
    (the reference)."""
    model = tiny_hf_model(kind) if model is None else model
    generator = torch.Generator().manual_seed(seed)
    scale = alpha / (rank**0.5 if rslora else rank)
    tensors = {}
    with torch.no_grad():
        for name, module in model.named_modules():
            if name.rpartition(".")[2] not in LORA_TARGETS:
                continue
            out_features, in_features = module.weight.shape
            a = 0.2 * torch.randn(rank, in_features, generator=generator)
            b = 0.2 * torch.randn(out_features, rank, generator=generator)
            tensors[f"base_model.model.{name}.lora_A.weight"] = a
            tensors[f"base_model.model.{name}.lora_B.weight"] = b
            module.weight += scale * b @ a
    path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, path / "adapter_model.safetensors")
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": alpha,
        "use_rslora": rslora,
        "target_modules": list(LORA_TARGETS),
        "bias": "none",
        "task_type": "CAUSAL_LM",
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return model
