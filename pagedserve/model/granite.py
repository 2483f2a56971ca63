"""IBM Granite 3.x (``GraniteForCausalLM``): the Llama layout with four scalars from its config.

- ``embedding_multiplier`` scales the token embeddings (not the tied lm head's weight);
- ``attention_multiplier`` is the scores' scale, in place of ``head_dim ** -0.5``;
- ``residual_multiplier`` scales each block's output (the attention's, the MLP's) before it
  is added to the residual stream;
- the logits are divided by ``logits_scaling``.

Each is 1 where the config leaves it out (transformers' defaults), and must be a positive
number: zero would zero the embeddings or the blocks, or divide the logits by zero.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any

import torch
from torch import nn

from pagedserve.model.layers.embedding import Embedding
from pagedserve.model.llama import LlamaDecoderLayer, LlamaForCausalLM, LlamaModel


def multiplier(config: Any, field: str) -> float:
    """The config's ``field`` (one of the four scalars above), 1.0 where absent."""
    value = getattr(config, field, 1.0)
    number = isinstance(value, int | float) and not isinstance(value, bool)
    if not (number and math.isfinite(value) and value > 0):
        raise ValueError(f"{field} must be a positive number, got {value!r}")
    return float(value)


class ScaledEmbedding(Embedding):
    """``weight[ids] * multiplier``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, multiplier: float) -> None:
        super().__init__(num_embeddings, embedding_dim)
        self.multiplier = multiplier

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return super().forward(ids) * self.multiplier


class GraniteDecoderLayer(LlamaDecoderLayer):
    """Llama's layer with the config's scores' scale and residual multiplier (which
    :meth:`LlamaDecoderLayer.forward` applies to each block's output)."""

    def __init__(
        self, config: Any, index: int, biases: tuple[bool, bool, bool], qk_norm: bool
    ) -> None:
        super().__init__(config, index, biases, qk_norm)
        self.self_attn.attn.scale = multiplier(config, "attention_multiplier")
        self.residual_multiplier = multiplier(config, "residual_multiplier")


class GraniteModel(LlamaModel):
    def __init__(self, config: Any, biases: tuple[bool, bool, bool], qk_norm: bool) -> None:
        layer = partial(GraniteDecoderLayer, config, biases=biases, qk_norm=qk_norm)
        super().__init__(config, biases, qk_norm, layer)
        self.embed_tokens = ScaledEmbedding(
            config.vocab_size, config.hidden_size, multiplier(config, "embedding_multiplier")
        )


class GraniteForCausalLM(LlamaForCausalLM):
    """Granite over the paged KV cache; see the module docstring."""

    def build_model(self, config: Any) -> nn.Module:
        self.logits_scaling = multiplier(config, "logits_scaling")
        return GraniteModel(config, self.biases(config), self.qk_norm)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return super().compute_logits(hidden) / self.logits_scaling
