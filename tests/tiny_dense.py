"""Tiny random Gemma 1, Granite and OLMo 2 models (the dense families of
tests/test_dense_families.py), sized as tests/tiny_models.py sizes the others."""

from __future__ import annotations

from pathlib import Path

import torch
from tiny_models import _SIZES
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GraniteConfig,
    GraniteForCausalLM,
    Olmo2Config,
    Olmo2ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
)

DENSE_KINDS = ["gemma", "granite", "olmo2"]


def dense_config(kind: str) -> PretrainedConfig:
    """``gemma`` (heads of 32, twice hidden / heads; tied head), ``granite`` (all four
    multipliers away from 1, the scores' scale away from head_dim ** -0.5; tied head) or
    ``olmo2`` (untied head, q/k norms over whole projections)."""
    if kind == "gemma":
        return GemmaConfig(**_SIZES, head_dim=32, hidden_act="gelu_pytorch_tanh")
    if kind == "granite":
        return GraniteConfig(
            **_SIZES,
            tie_word_embeddings=True,
            embedding_multiplier=6.0,
            attention_multiplier=0.1,
            residual_multiplier=0.3,
            logits_scaling=4.0,
        )
    if kind == "olmo2":
        return Olmo2Config(**_SIZES, rope_parameters={"rope_type": "default", "rope_theta": 5e5})
    raise ValueError(f"unknown dense model kind {kind!r}")


def dense_hf_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A transformers model of ``kind`` with every weight random (norms near 1: Gemma's stored
    weight near 0, the others' near 1)."""
    model_class = {
        "gemma": GemmaForCausalLM,
        "granite": GraniteForCausalLM,
        "olmo2": Olmo2ForCausalLM,
    }[kind]
    torch.manual_seed(seed)
    model = model_class(dense_config(kind)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            near_one = "norm" in name and kind != "gemma"
            param.copy_(1 + 0.1 * noise if near_one else 0.1 * noise)
    return model


def write_dense_model(path: Path, kind: str, tokenizer=None) -> Path:
    """Save a tiny model directory (config.json, safetensors, the tokenizer if given)."""
    dense_hf_model(kind).save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
