"""Tiny random Mixture-of-Experts models (Mixtral, Qwen2-MoE, Qwen3-MoE) for tests: SmolLM2's
vocabulary (so its tokenizer can be saved beside them), hidden 64, 4 experts, top-2, 2 layers."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import (
    MixtralConfig,
    MixtralForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

MOE_KINDS = ["mixtral", "qwen2_moe", "qwen3_moe"]
_SIZES = dict(
    vocab_size=49152,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    num_experts_per_tok=2,
    max_position_embeddings=256,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=2,
)


def tiny_moe_config(kind: str) -> PretrainedConfig:
    """``mixtral`` (a sliding window of 8 on every layer), ``qwen2_moe`` (q/k/v bias, a shared
    expert, top-k weights not renormalised, the second layer dense: ``mlp_only_layers``) or
    ``qwen3_moe`` (q/k norms, top-k renormalised, the first layer dense: ``decoder_sparse_step``
    2)."""
    if kind == "mixtral":
        return MixtralConfig(**_SIZES, num_local_experts=4, sliding_window=8)
    if kind == "qwen2_moe":
        return Qwen2MoeConfig(
            **_SIZES,
            num_experts=4,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=48,
            norm_topk_prob=False,
            mlp_only_layers=[1],
        )
    if kind == "qwen3_moe":
        return Qwen3MoeConfig(
            **_SIZES,
            num_experts=4,
            moe_intermediate_size=32,
            head_dim=32,
            norm_topk_prob=True,
            decoder_sparse_step=2,
        )
    raise ValueError(f"unknown tiny MoE kind {kind!r}")


def tiny_moe_model(kind: str, seed: int = 0) -> PreTrainedModel:
    """A transformers model of ``kind``, every weight random (norms near 1) so that a wrong
    mapping of any tensor, or of any expert, shows in the logits."""
    model_class = {
        "mixtral": MixtralForCausalLM,
        "qwen2_moe": Qwen2MoeForCausalLM,
        "qwen3_moe": Qwen3MoeForCausalLM,
    }[kind]
    torch.manual_seed(seed)
    model = model_class(tiny_moe_config(kind)).float().eval()
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn_like(param)
            param.copy_(1 + 0.1 * noise if "norm" in name else 0.1 * noise)
    return model


def write_tiny_moe(path: Path, kind: str, tokenizer=None, stacked: bool = False) -> Path:
    """Save a tiny MoE model directory: with ``save_pretrained`` (the Hub's per-expert names),
    or with ``stacked`` its in-memory state dict (transformers 5's stacked expert tensors)."""
    model = tiny_moe_model(kind)
    if stacked:
        model.config.architectures = [type(model).__name__]
        model.config.save_pretrained(path)
        tensors = {name: t.contiguous() for name, t in model.state_dict().items()}
        save_file(tensors, path / "model.safetensors")
    else:
        model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path
