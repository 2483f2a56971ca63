"""BERT-style encoders (BERT, RoBERTa, XLM-RoBERTa): the models behind most sentence embeddings
(bge, e5, all-MiniLM, multilingual-e5, bge-m3).

Every token attends to every other token of its input, so an input runs whole in one step and
keeps no K/V: the engine gives an encoder no KV pools, no chunked prefill and no prefix caching
(its blocks only count how many inputs fit a step). Post-norm layers: self-attention, then
``LayerNorm(x + attention)``, a GELU MLP, then ``LayerNorm(x + mlp)``. Modules are named as
transformers names them, so checkpoints load by name; the q/k/v projections are one GEMM.
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
from pagedserve.model.layers.linear import Linear, MergedLinear
from pagedserve.model.strict_loading import check_complete, copy_into

# Checkpoint tensors an encoder embedding does not use: the pretraining heads and BERT's
# pooler (sentence-transformers pools the token states itself), and a saved position buffer.
_UNUSED = ("pooler.", "cls.", "lm_head.", "embeddings.position_ids")
_QKV = {"query": 0, "key": 1, "value": 2}


class BertEmbeddings(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.word_embeddings = nn.Embedding(config.vocab_size, hidden)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, hidden)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, hidden)
        self.LayerNorm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, types: torch.Tensor | None
    ) -> torch.Tensor:
        """``types`` None: every token is of type 0 (one text per input)."""
        x = self.word_embeddings(input_ids) + self.position_embeddings(positions)
        if types is None:
            return self.LayerNorm(x + self.token_type_embeddings.weight[0])
        return self.LayerNorm(x + self.token_type_embeddings(types))


class _Dense(nn.Module):
    """transformers' ``dense`` + ``LayerNorm`` pair (``BertSelfOutput``, ``BertOutput``)."""

    def __init__(self, in_features: int, config: Any) -> None:
        super().__init__()
        self.dense = Linear(in_features, config.hidden_size, bias=True)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class BertAttention(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        hidden = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = hidden // self.num_heads
        self.qkv = MergedLinear(hidden, [hidden] * 3, bias=True)
        self.output = _Dense(hidden, config)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        heads = (self.num_heads, self.head_dim)
        out = [
            F.scaled_dot_product_attention(
                *(t.view(n, *heads).transpose(0, 1) for t in (qi, ki, vi))
            )
            .transpose(0, 1)
            .reshape(n, -1)
            for qi, ki, vi, n in zip(
                q.split(lengths), k.split(lengths), v.split(lengths), lengths, strict=True
            )
        ]
        return self.output(torch.cat(out), x)


class BertLayer(nn.Module):
    def __init__(self, config: Any) -> None:
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = nn.Module()
        self.intermediate.dense = Linear(config.hidden_size, config.intermediate_size, bias=True)
        self.act = ACT2FN[config.hidden_act]
        self.output = _Dense(config.intermediate_size, config)

    def forward(self, x: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        x = self.attention(x, lengths)
        return self.output(self.act(self.intermediate.dense(x)), x)


class BertModel(Encoder):
    """A BERT encoder over a step's flattened inputs; returns every token's final state."""

    # Added to positions: RoBERTa numbers them from its padding id + 1.
    position_offset = 0
    unused = _UNUSED
    # A cross-encoder's pair ``[CLS] a [SEP] b [SEP]`` marks b's tokens as type 1: set to the
    # tokenizer's [SEP] id where the model has two token types and scores pairs.
    sep_token_id: int | None = None

    def __init__(self, config: Any) -> None:
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = nn.Module()
        self.encoder.layer = nn.ModuleList(
            BertLayer(config) for _ in range(config.num_hidden_layers)
        )

    @property
    def max_positions(self) -> int:
        """The longest input the position table covers."""
        return self.config.max_position_embeddings - self.position_offset

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        cu = meta.query_start_loc_cpu
        lengths = self.input_lengths(meta)
        types = None if self.sep_token_id is None else self._pair_types(input_ids, cu, lengths)
        x = self.embeddings(input_ids, positions + self.position_offset, types)
        for layer in self.encoder.layer:
            x = layer(x, lengths)
        return x

    def _pair_types(
        self, input_ids: torch.Tensor, cu: list[int], lengths: list[int]
    ) -> torch.Tensor:
        """1 for each token after its input's first [SEP], else 0 (BERT's pair encoding)."""
        is_sep = (input_ids == self.sep_token_id).long()
        before = torch.cumsum(is_sep, 0) - is_sep  # [SEP]s before each token, in the whole step
        starts = torch.tensor(cu[:-1], device=input_ids.device)
        base = before[starts].repeat_interleave(torch.tensor(lengths, device=input_ids.device))
        return (before > base).long()

    @torch.no_grad()
    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy transformers-named tensors in (a ``bert.`` or ``roberta.`` prefix, as the
        pretraining checkpoints have, is dropped); every parameter must be filled."""
        params = dict(self.named_parameters())
        missing = set()  # names, and name[shard] of each q/k/v piece
        for module_name, module in self.named_modules():
            for param_name, _ in module.named_parameters(recurse=False):
                full = f"{module_name}.{param_name}"
                if isinstance(module, MergedLinear):
                    missing.update(f"{full}[{shard}]" for shard in _QKV.values())
                else:
                    missing.add(full)
        for name, tensor in weights:
            name = name.removeprefix("bert.").removeprefix("roberta.")
            if name.startswith(self.unused):
                continue
            parent, _, leaf = name.rpartition(".")
            module_path, _, proj = parent.rpartition(".")
            if proj in _QKV and module_path.endswith("attention.self"):
                target = f"{module_path.removesuffix('.self')}.qkv"
                self.get_submodule(target).load_shard(_QKV[proj], leaf, tensor)
                missing.discard(f"{target}.{leaf}[{_QKV[proj]}]")
                continue
            copy_into(params, name, tensor)
            missing.discard(name)
        check_complete(missing)


class RobertaModel(BertModel):
    """RoBERTa and XLM-RoBERTa: BERT with positions counted from ``pad_token_id + 1``."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.position_offset = config.pad_token_id + 1


_HEADS_UNUSED = ("cls.", "lm_head.", "embeddings.position_ids")


class BertForSequenceClassification(BertModel):
    """A BERT cross-encoder (the ms-marco MiniLM rerankers): each input is a pair, scored from
    its [CLS] state by the pooler's tanh layer and the classifier."""

    unused = _HEADS_UNUSED

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.pooler = nn.Module()
        self.pooler.dense = Linear(hidden, hidden, bias=True)
        self.classifier = Linear(hidden, config.num_labels, bias=True)

    def classify(self, first_token: torch.Tensor) -> torch.Tensor:
        """The label logits ``[N, labels]`` of first-token states ``[N, H]``."""
        return self.classifier(torch.tanh(self.pooler.dense(first_token)))


class RobertaForSequenceClassification(RobertaModel):
    """An XLM-RoBERTa or RoBERTa cross-encoder (bge-reranker): ``classifier.dense``, tanh,
    ``classifier.out_proj`` on the first token's state."""

    unused = _HEADS_UNUSED

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        hidden = config.hidden_size
        self.classifier = nn.Module()
        self.classifier.dense = Linear(hidden, hidden, bias=True)
        self.classifier.out_proj = Linear(hidden, config.num_labels, bias=True)

    def classify(self, first_token: torch.Tensor) -> torch.Tensor:
        """The label logits ``[N, labels]`` of first-token states ``[N, H]``."""
        return self.classifier.out_proj(torch.tanh(self.classifier.dense(first_token)))
