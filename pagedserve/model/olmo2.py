"""OLMo 2 (``Olmo2ForCausalLM``): the Llama layout with its norms moved after the blocks.

- a layer has no input norms: it norms its attention's output (``post_attention_layernorm``)
  and its MLP's output (``post_feedforward_layernorm``) before adding each to the residual
  stream;
- ``q_norm`` and ``k_norm`` RMS-norm the whole q and k projections (``heads * head_dim`` wide,
  not each head), before the rotation.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from pagedserve.model.layers.attention import AttentionMetadata
from pagedserve.model.layers.norm import RMSNorm
from pagedserve.model.layers.rotary import apply_rotary
from pagedserve.model.llama import (
    LlamaAttention,
    LlamaForCausalLM,
    LlamaMLP,
    LlamaModel,
    Rope,
    sliding_window_of,
)


class Olmo2Attention(LlamaAttention):
    def __init__(self, config: Any, bias: bool, window: int | None) -> None:
        super().__init__(config, bias, bias, qk_norm=False, window=window)
        if self.rotary_dim != self.head_dim:
            raise ValueError(
                f"OLMo 2 rotates whole heads: partial_rotary_factor "
                f"{self.rotary_dim / self.head_dim:g} is not supported (only 1.0)"
            )
        self.q_norm = RMSNorm(self.q_size, config.rms_norm_eps)
        self.k_norm = RMSNorm(self.kv_size, config.rms_norm_eps)

    def forward(
        self, rope: Rope, x: torch.Tensor, meta: AttentionMetadata, output_only: bool = False
    ) -> torch.Tensor:
        qkv = self.qkv_proj(x)
        q_end, k_end = self.q_size, self.q_size + self.kv_size
        q, k = self.q_norm(qkv[:, :q_end]), self.k_norm(qkv[:, q_end:k_end])
        num_tokens = qkv.shape[0]
        # q and k heads share the rotation, so rotate them in one go.
        qk = torch.cat((q, k), 1).view(num_tokens, self.num_heads + self.num_kv_heads, -1)
        qk = apply_rotary(qk, *rope)
        q, k = qk[:, : self.num_heads].flatten(1), qk[:, self.num_heads :].flatten(1)
        return self.o_proj(self.attn(q, k, qkv[:, k_end:], meta, output_only))


class Olmo2DecoderLayer(nn.Module):
    def __init__(
        self, config: Any, index: int, biases: tuple[bool, bool, bool], qk_norm: bool
    ) -> None:
        super().__init__()
        qkv_bias, _, mlp_bias = biases
        self.self_attn = Olmo2Attention(config, qkv_bias, sliding_window_of(config, index))
        self.mlp = LlamaMLP(config, mlp_bias)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self, rope: Rope, hidden: torch.Tensor, meta: AttentionMetadata, output_only: bool = False
    ) -> torch.Tensor:
        """The residual stream after this layer; with ``output_only`` (the last layer) and
        ``meta.output_rows`` set, only those rows (as :class:`LlamaDecoderLayer` does)."""
        attended = self.self_attn(rope, hidden, meta, output_only)
        if output_only and meta.output_rows is not None:
            hidden = hidden.index_select(0, meta.output_rows)
        hidden = hidden + self.post_attention_layernorm(attended)
        return hidden + self.post_feedforward_layernorm(self.mlp(hidden))


class Olmo2Model(LlamaModel):
    def __init__(self, config: Any, biases: tuple[bool, bool, bool], qk_norm: bool) -> None:
        layer = partial(Olmo2DecoderLayer, config, biases=biases, qk_norm=qk_norm)
        super().__init__(config, biases, qk_norm, layer)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        hidden = self.embed_tokens(input_ids)
        rope = self.rotary_emb(positions)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            hidden = layer(rope, hidden, meta, output_only=i == last)
        return self.norm(hidden)


class Olmo2ForCausalLM(LlamaForCausalLM):
    """OLMo 2 over the paged KV cache; see the module docstring."""

    def build_model(self, config: Any) -> nn.Module:
        return Olmo2Model(config, self.biases(config), self.qk_norm)
