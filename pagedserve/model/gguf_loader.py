"""GGUF files (llama.cpp's format): a transformers config from the metadata, and the tensors
dequantized to float32 under their Hugging Face names.

Dequantization is ``gguf.quants.dequantize`` (vectorised numpy), so every type the ``gguf``
package reads works: F32, F16, BF16, Q8_0, Q4_0/1, Q5_0/1, the K-quants and the I-quants.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import Q4_K, dequantize
from transformers import (
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    Phi3Config,
    PretrainedConfig,
    Qwen2Config,
    Qwen3Config,
)

from pagedserve.kernels.packed_gemm import QuantBlocks
from pagedserve.model.llama import ROPE_FREQ_FACTORS

# general.architecture -> (HF architecture name, config class)
GGUF_ARCHITECTURES: dict[str, tuple[str, type[PretrainedConfig]]] = {
    "llama": ("LlamaForCausalLM", LlamaConfig),
    "qwen2": ("Qwen2ForCausalLM", Qwen2Config),
    "qwen3": ("Qwen3ForCausalLM", Qwen3Config),
    "phi3": ("Phi3ForCausalLM", Phi3Config),
    "gemma2": ("Gemma2ForCausalLM", Gemma2Config),
    "gemma3": ("Gemma3ForCausalLM", Gemma3TextConfig),
}
GEMMA = ("gemma2", "gemma3")
# llama.cpp's names of Mixture-of-Experts architectures (its Mixtral is "llama" with experts).
MOE_GGUF_ARCHITECTURES = ("qwen2moe", "qwen3moe", "mixtral")

_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_PER_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Phi-3 stores q/k/v and gate/up fused, as its Hugging Face checkpoints do.
_FUSED_BLOCK = {**_PER_BLOCK, "attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"}
# Gemma norms the attention's and the MLP's outputs too, and its ffn_norm is the MLP's input norm.
_GEMMA_BLOCK = {
    **_PER_BLOCK,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
_BLOCK_NAMES = {"phi3": _FUSED_BLOCK, "gemma2": _GEMMA_BLOCK, "gemma3": _GEMMA_BLOCK}
# Long-RoPE's per-frequency factors (Phi-3 128k, Phi-4-mini): config, not weights.
_LONGROPE = {"rope_factors_long.weight": "long_factor", "rope_factors_short.weight": "short_factor"}


def open_gguf(path: str) -> GGUFReader:
    """A parsed GGUF file (memory-mapped). Parsing the metadata of a file with a 50k-token
    vocabulary takes about two seconds, so the model and tokenizer loaders share one reader
    (until the file changes)."""
    stat = os.stat(path)
    return _open_gguf(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=2)
def _open_gguf(path: str, mtime_ns: int, size: int) -> GGUFReader:
    return GGUFReader(path)


def metadata(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def gguf_architecture(reader: GGUFReader) -> str:
    arch = metadata(reader, "general.architecture")
    experts = metadata(reader, f"{arch}.expert_count", 0)
    if experts or arch in MOE_GGUF_ARCHITECTURES:
        count = f", {experts} experts" if experts else ""
        raise ValueError(
            f"GGUF files of Mixture-of-Experts models are not supported (architecture {arch!r}"
            f"{count}); serve the model's Hugging Face safetensors checkpoint (config.json + "
            "*.safetensors) instead"
        )
    if arch not in GGUF_ARCHITECTURES:
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {', '.join(GGUF_ARCHITECTURES)}"
        )
    return arch


def gguf_config(reader: GGUFReader) -> PretrainedConfig:
    """A LlamaConfig / Qwen2Config / Qwen3Config / Phi3Config equivalent to the one the GGUF was
    converted from."""
    arch = gguf_architecture(reader)
    hf_arch, config_class = GGUF_ARCHITECTURES[arch]

    def arch_key(key: str, default: Any = None) -> Any:
        return metadata(reader, f"{arch}.{key}", default)

    tensors = {t.name: t for t in reader.tensors}
    hidden = arch_key("embedding_length")
    heads = arch_key("attention.head_count")
    head_dim = arch_key("attention.key_length") or arch_key("rope.dimension_count")
    vocab_size = arch_key("vocab_size") or int(tensors["token_embd.weight"].shape[1])
    extra: dict[str, Any] = {}
    if arch == "phi3":
        head_dim, extra = hidden // heads, _phi3_settings(arch_key, tensors, hidden // heads)
    rope_scaling = extra.pop("rope_scaling", None) or _rope_scaling(
        arch_key("rope.scaling.type"), arch_key("rope.scaling.factor")
    )
    theta = arch_key("rope.freq_base", 10000.0)
    rope: dict[str, Any] = {"rope_theta": theta, "rope_scaling": rope_scaling}
    if arch in GEMMA:
        extra = _gemma_settings(arch, arch_key, hidden // heads, head_dim or hidden // heads)
    if arch == "gemma3":  # the sliding layers' base is llama.cpp's, not the file's
        full = {**(rope_scaling or {"rope_type": "default"}), "rope_theta": theta}
        local = {"rope_type": "default", "rope_theta": 10000.0}
        extra["rope_parameters"] = {"sliding_attention": local, "full_attention": full}
        rope = {}
    return config_class(
        **extra,
        **rope,
        architectures=[hf_arch],
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=arch_key("feed_forward_length"),
        num_hidden_layers=arch_key("block_count"),
        num_attention_heads=heads,
        num_key_value_heads=arch_key("attention.head_count_kv", heads),
        head_dim=head_dim or hidden // heads,
        max_position_embeddings=arch_key("context_length"),
        rms_norm_eps=arch_key("attention.layer_norm_rms_epsilon", 1e-6),
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias="blk.0.attn_q.bias" in tensors,
        bos_token_id=metadata(reader, "tokenizer.ggml.bos_token_id"),
        eos_token_id=metadata(reader, "tokenizer.ggml.eos_token_id"),
        pad_token_id=metadata(reader, "tokenizer.ggml.padding_token_id"),
    )


def _phi3_settings(arch_key: Any, tensors: dict[str, Any], head_dim: int) -> dict[str, Any]:
    """What llama.cpp's Phi-3 conversion keeps beside the Llama keys: the rotary share of each
    head (``rope.dimension_count``), the sliding window (0: none, as Phi-4 writes it) and
    long-RoPE's factor tensors with the pretraining context."""
    settings: dict[str, Any] = {
        "partial_rotary_factor": arch_key("rope.dimension_count", head_dim) / head_dim,
        "sliding_window": arch_key("attention.sliding_window") or None,
    }
    original = arch_key("rope.scaling.original_context_length")
    if original is not None:
        settings["original_max_position_embeddings"] = original
    if all(name in tensors for name in _LONGROPE):
        scaling = {
            key: dequantize(tensors[name].data, tensors[name].tensor_type).tolist()
            for name, key in _LONGROPE.items()
        }
        scaling.update(rope_type="longrope", original_max_position_embeddings=original)
        settings["rope_scaling"] = scaling
    return settings


def _gemma_settings(arch: str, arch_key: Any, width_per_head: int, head_dim: int) -> dict[str, Any]:
    """What llama.cpp knows of Gemma 2 and 3 without the file saying it: scores scaled by the
    head size, but by hidden / heads in the 27B models (46 and 62 layers); every other layer
    sliding in Gemma 2, five in six in Gemma 3 (unless the file gives the pattern)."""
    layers = arch_key("block_count")
    big = layers == (46 if arch == "gemma2" else 62)
    pattern = arch_key("attention.sliding_window_pattern") or (2 if arch == "gemma2" else 6)
    scale = arch_key("attention.scale")  # the scores' multiplier, where a file gives it
    settings: dict[str, Any] = {
        "query_pre_attn_scalar": scale**-2 if scale else (width_per_head if big else head_dim),
        "sliding_window": arch_key("attention.sliding_window"),
        "layer_types": [
            "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(layers)
        ],
        "final_logit_softcapping": arch_key("final_logit_softcapping"),
    }
    if arch == "gemma2":
        settings["attn_logit_softcapping"] = arch_key("attn_logit_softcapping")
    return settings


def _rope_scaling(kind: str | None, factor: float | None) -> dict[str, Any] | None:
    if kind in (None, "none") or factor in (None, 1.0):
        return None
    if kind != "linear":
        raise ValueError(f"unsupported GGUF rope scaling {kind!r}; supported: linear")
    return {"rope_type": "linear", "factor": float(factor)}


def hf_tensor_name(gguf_name: str, arch: str = "llama") -> str:
    """``blk.3.attn_q.weight`` -> ``model.layers.3.self_attn.q_proj.weight``."""
    if gguf_name == "rope_freqs.weight":
        return ROPE_FREQ_FACTORS
    base, _, suffix = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, index, kind = base.split(".", 2)
        names = _BLOCK_NAMES.get(arch, _PER_BLOCK)
        if kind in names:
            return f"model.layers.{index}.{names[kind]}.{suffix}"
    elif base in _TOP_LEVEL:
        return f"{_TOP_LEVEL[base]}.{suffix}"
    raise ValueError(f"GGUF tensor {gguf_name!r} has no counterpart in the model")


def unpermute_rotary(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's convert-time permutation of Llama q/k rows.

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)... and so reorders each head's rows
    from Hugging Face's two halves to interleaved; this puts them back in halves.
    """
    half = weight.shape[0] // num_heads // 2
    rest = weight.shape[1:]
    return weight.reshape(num_heads, half, 2, *rest).transpose(1, 2).reshape(weight.shape)


def gguf_weights(
    reader: GGUFReader, config: PretrainedConfig
) -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor dequantized to float32, under its Hugging Face name, one at a time."""
    arch = gguf_architecture(reader)
    for tensor in reader.tensors:
        if tensor.name in _LONGROPE:
            continue  # in the config (see gguf_config)
        array = dequantize(tensor.data, tensor.tensor_type)
        weight = torch.from_numpy(array if array.flags.writeable else np.array(array))
        name = hf_tensor_name(tensor.name, arch)
        if arch in GEMMA and name.endswith("norm.weight"):
            weight = weight - 1  # llama.cpp's convert stores Gemma's norm weights plus one
        yield name, _in_hf_order(reader, config, name, weight)


def quantized_blocks(
    reader: GGUFReader, config: PretrainedConfig
) -> Iterator[tuple[str, QuantBlocks]]:
    """The matrices stored in a type the few-row GEMM reads, as blocks in one of its two
    layouts (rows in the order :func:`gguf_weights` gives their weights), under their Hugging
    Face names: Q4_1 and Q4_K in the Q4_1 layout, Q8_0 and Q4_0 in the Q8_0 layout, Q6_K in
    Q8_0x16. Each conversion keeps the float32 weight that gguf's dequantization computes, to
    the bit."""
    arch = gguf_architecture(reader)
    for tensor in reader.tensors:
        convert = _TO_LAYOUT.get(tensor.tensor_type)
        if convert is None or len(tensor.shape) != 2:
            continue
        rows = int(tensor.shape[1])
        layout, parts = convert(np.asarray(tensor.data).reshape(rows, -1))
        name = hf_tensor_name(tensor.name, arch)
        scale, minimum, quants = (
            None if part is None else _in_hf_order(reader, config, name, torch.from_numpy(part))
            for part in parts
        )
        yield name, QuantBlocks(layout, scale, minimum, quants)


Parts = tuple[np.ndarray, np.ndarray | None, np.ndarray]


def _halves(raw: np.ndarray, count: int) -> list[np.ndarray]:
    """The first ``count`` float16 fields of each block, as float32 ``[rows, blocks]`` arrays."""
    values = raw[..., : 2 * count].copy().view(np.float16).astype(np.float32)
    return [np.ascontiguousarray(values[..., i]) for i in range(count)]


def _q4_1(raw: np.ndarray) -> tuple[str, Parts]:
    blocks = raw.reshape(raw.shape[0], -1, 20)  # d, m, 16 bytes of 4-bit values
    d, m = _halves(blocks, 2)
    return "Q4_1", (d, m, np.ascontiguousarray(blocks[..., 4:]))


def _q8_0(raw: np.ndarray) -> tuple[str, Parts]:
    blocks = raw.reshape(raw.shape[0], -1, 34)  # d, 32 signed bytes
    (d,) = _halves(blocks, 1)
    return "Q8_0", (d, None, np.ascontiguousarray(blocks[..., 2:]))


def _q4_0(raw: np.ndarray) -> tuple[str, Parts]:
    """w = d * (q - 8): the Q8_0 layout with the signed values q - 8."""
    blocks = raw.reshape(raw.shape[0], -1, 18)  # d, 16 bytes of 4-bit values
    (d,) = _halves(blocks, 1)
    packed = blocks[..., 2:]
    values = np.concatenate([packed & 15, packed >> 4], axis=-1).astype(np.int8) - np.int8(8)
    return "Q8_0", (d, None, values.view(np.uint8))


def _q4_k(raw: np.ndarray) -> tuple[str, Parts]:
    """Super-blocks of 256: per 32 inputs a 6-bit scale and minimum under float16 d and dmin;
    w = (d * sc) * q - dmin * m, which is the Q4_1 layout with scale d * sc and minimum
    -(dmin * m) (each product rounded to float32 as gguf computes it)."""
    rows = raw.shape[0]
    blocks = raw.reshape(rows, -1, 144)  # d, dmin, 12 bytes of scales, 128 of 4-bit values
    d, dmin = _halves(blocks, 2)
    sc, m = Q4_K.get_scale_min(blocks[..., 4:16].reshape(-1, 12))
    scale = (d[..., None] * sc.reshape(rows, -1, 8).astype(np.float32)).reshape(rows, -1)
    minimum = -(dmin[..., None] * m.reshape(rows, -1, 8).astype(np.float32)).reshape(rows, -1)
    # 32 bytes hold two sub-blocks of 32: low nibbles, then high ones
    codes = (
        blocks[..., 16:].reshape(rows, -1, 4, 1, 32) >> np.array([0, 4], dtype=np.uint8)[:, None]
    )
    values = (codes & 15).reshape(rows, -1, 32)  # [rows, k / 32, 32]
    nibbles = values[..., :16] | (values[..., 16:] << 4)  # Q4_1's byte layout
    return "Q4_1", (scale, minimum, np.ascontiguousarray(nibbles))


def _q6_k(raw: np.ndarray) -> tuple[str, Parts]:
    """Super-blocks of 256: 6-bit values under a signed 8-bit scale per 16 inputs and float16 d;
    w = (d * sc) * (q - 32), the per-16-scale Q8_0 layout with signed values q - 32. The values
    are unpacked as gguf's dequantization unpacks them."""
    rows = raw.shape[0]
    blocks = raw.reshape(-1, 210)  # 128 bytes of low 4 bits, 64 of high 2, 16 scales, d
    ql, qh, sc, d = blocks[:, :128], blocks[:, 128:192], blocks[:, 192:208], blocks[:, 208:]
    scale = d.copy().view(np.float16).astype(np.float32) * sc.view(np.int8).astype(np.float32)
    low = ql.reshape(len(blocks), -1, 1, 64) >> np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    high = qh.reshape(len(blocks), -1, 1, 32) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(
        1, 1, 4, 1
    )
    low = (low & 15).reshape(len(blocks), -1, 32)
    high = (high & 3).reshape(len(blocks), -1, 32)
    values = (low | (high << 4)).astype(np.int8) - np.int8(32)
    return "Q8_0x16", (
        np.ascontiguousarray(scale.reshape(rows, -1)),
        None,
        np.ascontiguousarray(values.view(np.uint8).reshape(rows, -1, 32)),
    )


_TO_LAYOUT = {
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q8_0: _q8_0,
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_K: _q4_k,
    GGMLQuantizationType.Q6_K: _q6_k,
}


def _in_hf_order(
    reader: GGUFReader, config: PretrainedConfig, name: str, rows: torch.Tensor
) -> torch.Tensor:
    """A tensor's rows as Hugging Face orders them: llama.cpp permutes Llama's q/k rows."""
    if gguf_architecture(reader) != "llama":
        return rows
    if ".self_attn.q_proj." in name:
        return unpermute_rotary(rows, config.num_attention_heads)
    if ".self_attn.k_proj." in name:
        return unpermute_rotary(rows, config.num_key_value_heads)
    return rows
