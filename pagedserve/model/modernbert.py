"""ModernBERT encoders: the models behind newer sentence embeddings and rerankers
(gte-modernbert-base, modernbert-embed-base, gte-reranker-modernbert-base).

Pre-norm layers with rotary positions and no position table; every third layer (by default)
attends over the whole input, the others only to tokens at most ``local_attention // 2`` away on
either side, each kind with its own rotary base. The MLP is a GeGLU (``Wi`` makes the input and
the gate in one GEMM). Like the BERT encoders (``model/bert.py``), an input runs whole in one
step and keeps no K/V. Modules are named as transformers names them.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers.activations import ACT2FN

from pagedserve.model.encoder import Encoder
from pagedserve.model.layers.attention import AttentionMetadata
from pagedserve.model.layers.linear import Linear
from pagedserve.model.strict_loading import check_complete, copy_into

FULL, SLIDING = "full_attention", "sliding_attention"


def layer_types(config: Any) -> list[str]:
    """Each layer's attention: transformers 5 lists them; older configs give
    ``global_attn_every_n_layers`` (layer i is global where i is a multiple of it)."""
    types = getattr(config, "layer_types", None)
    if types:
        return list(types)
    every = getattr(config, "global_attn_every_n_layers", 3)
    return [SLIDING if i % every else FULL for i in range(config.num_hidden_layers)]


def rope_theta(config: Any, kind: str) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    if params.get(kind) and "rope_theta" in params[kind]:
        return float(params[kind]["rope_theta"])
    if kind == FULL:
        return float(getattr(config, "global_rope_theta", 160000.0))
    return float(getattr(config, "local_rope_theta", 10000.0))


def _norm(config: Any) -> nn.LayerNorm:
    return nn.LayerNorm(config.hidden_size, eps=config.norm_eps, bias=config.norm_bias)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary positions, rotating the two halves of each head: ``x`` [T, H, D], ``cos``/``sin``
    [T, 1, D]."""
    first, second = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-second, first), dim=-1) * sin


class ModernBertAttention(nn.Module):
    def __init__(self, config: Any, window: int | None) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.window = window  # None: the whole input
        self.Wqkv = Linear(hidden, 3 * hidden, bias=config.attention_bias)
        self.Wo = Linear(hidden, hidden, bias=config.attention_bias)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]
    ) -> torch.Tensor:
        q, k, v = self.Wqkv(x).view(-1, 3, self.num_heads, self.head_dim).unbind(1)
        cos, sin = rope
        q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
        out = []
        for qi, ki, vi in zip(q.split(lengths), k.split(lengths), v.split(lengths), strict=True):
            mask = None
            if self.window is not None and len(qi) > self.window:
                at = torch.arange(len(qi), device=x.device)
                mask = (at[:, None] - at[None, :]).abs() <= self.window
            heads = [t.transpose(0, 1) for t in (qi, ki, vi)]
            attended = F.scaled_dot_product_attention(*heads, attn_mask=mask)
            out.append(attended.transpose(0, 1).reshape(len(qi), -1))
        return self.Wo(torch.cat(out))


class ModernBertMLP(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.Wi = Linear(config.hidden_size, 2 * config.intermediate_size, bias=config.mlp_bias)
        self.Wo = Linear(config.intermediate_size, config.hidden_size, bias=config.mlp_bias)
        self.act = ACT2FN[config.hidden_activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        inputs, gate = self.Wi(x).chunk(2, dim=-1)
        return self.Wo(self.act(inputs) * gate)


class ModernBertLayer(nn.Module):
    def __init__(self, config: Any, index: int, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.attn_norm = nn.Identity() if index == 0 else _norm(config)
        window = None if kind == FULL else _half_window(config)
        self.attn = ModernBertAttention(config, window)
        self.mlp_norm = _norm(config)
        self.mlp = ModernBertMLP(config)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]
    ) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), rope, lengths)
        return x + self.mlp(self.mlp_norm(x))


def _half_window(config: Any) -> int:
    """How far a sliding layer's tokens see on each side (transformers' ``sliding_window``)."""
    return int(getattr(config, "local_attention", 128)) // 2


class ModernBertModel(Encoder):
    """A ModernBERT encoder over a step's flattened inputs; returns every token's final state."""

    unused: tuple[str, ...] = ("head.", "decoder.")  # a masked-LM checkpoint's head

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.embeddings = nn.Module()
        self.embeddings.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embeddings.norm = _norm(config)
        kinds = layer_types(config)
        self.layers = nn.ModuleList(
            ModernBertLayer(config, i, kind) for i, kind in enumerate(kinds)
        )
        self.final_norm = _norm(config)
        head_dim = config.hidden_size // config.num_attention_heads
        # float32, as transformers computes the angles: rounded alike at long positions
        exponents = torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim
        self._inv_freq = {kind: 1.0 / rope_theta(config, kind) ** exponents for kind in set(kinds)}

    @property
    def max_positions(self) -> int:
        return self.config.max_position_embeddings

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        lengths = self.input_lengths(meta)
        x = self.embeddings.norm(self.embeddings.tok_embeddings(input_ids))
        ropes = {}
        for kind, inv_freq in self._inv_freq.items():
            angles = positions.float()[:, None] * inv_freq.to(positions.device)
            angles = torch.cat((angles, angles), dim=-1)[:, None, :]
            ropes[kind] = (angles.cos().to(x.dtype), angles.sin().to(x.dtype))
        for layer in self.layers:
            x = layer(x, ropes[layer.kind], lengths)
        return self.final_norm(x)

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy transformers-named tensors in (the encoder's under ``model.`` in a masked-LM or
        classifier checkpoint); every parameter must be filled."""
        params = dict(self.named_parameters())
        missing = set(params)
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if name.startswith(self.unused):
                continue
            copy_into(params, name, tensor)
            missing.discard(name)
        check_complete(missing)


class ModernBertForSequenceClassification(ModernBertModel):
    """A ModernBERT cross-encoder or classifier: the pooled state (first token or mean, as
    ``classifier_pooling`` says) through ``head`` (dense, activation, LayerNorm) and
    ``classifier``."""

    unused = ()

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.default_pooling_type = config.classifier_pooling.upper()
        self.head = nn.Module()
        self.head.dense = Linear(hidden, hidden, bias=config.classifier_bias)
        self.head.norm = _norm(config)
        self.head_act = ACT2FN[config.classifier_activation]
        self.classifier = Linear(hidden, config.num_labels, bias=True)

    def classify(self, pooled: torch.Tensor) -> torch.Tensor:
        """The label logits ``[N, labels]`` of pooled states ``[N, H]``."""
        return self.classifier(self.head.norm(self.head_act(self.head.dense(pooled))))
