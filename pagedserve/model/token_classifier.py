"""A causal LM served as a classifier from its own logits of a few tokens (vLLM's
``classifier_from_token`` override): Qwen3-Reranker answers "yes" or "no" to whether a document
fits a query, and its relevance is P(yes) of those two.

The score head is built from the lm head's rows of those tokens: one label per token, or, for a
two-way softmax (``is_original_qwen3_reranker``, or ``"method": "from_2_way_softmax"``), the one
row ``yes - no``, whose sigmoid is softmax([no, yes])[yes].
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch

HEAD_SOURCES = ("lm_head.weight", "model.embed_tokens.weight", "embed_tokens.weight")


def two_way(config: Any) -> bool:
    """Whether the two tokens make one label (``config``: the overrides, or the config)."""
    settings = config if isinstance(config, dict) else vars(config)
    return bool(settings.get("is_original_qwen3_reranker")) or (
        settings.get("method") == "from_2_way_softmax"
    )


def resolve_token_ids(overrides: dict[str, Any], tokenizer: Any) -> dict[str, Any]:
    """``overrides`` with the ids of its ``classifier_from_token`` tokens and the labels they
    make (unchanged where it names none)."""
    tokens = overrides.get("classifier_from_token")
    if not tokens:
        return overrides
    ids = []
    for token in tokens:
        token_id = tokenizer.convert_tokens_to_ids(token)
        if token_id is None or token_id == tokenizer.unk_token_id:
            raise ValueError(f"classifier_from_token: {token!r} is not a token of the vocabulary")
        ids.append(token_id)
    if two_way(overrides) and len(ids) != 2:
        raise ValueError("a two-way softmax classifier takes two tokens: the 'no' and the 'yes'")
    labels = 1 if two_way(overrides) else len(ids)
    return {**overrides, "classifier_from_token_ids": ids, "num_labels": labels}


def with_score_weight(
    weights: Iterable[tuple[str, torch.Tensor]], config: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, then ``score.weight`` made from the lm head's rows of the
    configured tokens (the embedding's, where the lm head is tied to it)."""
    ids = torch.tensor(config.classifier_from_token_ids)
    sources: dict[str, torch.Tensor] = {}  # only the rows of those tokens are kept
    for name, tensor in weights:
        if name in HEAD_SOURCES:
            sources[name] = tensor[ids].float()
        yield name, tensor
    rows = next((sources[n] for n in HEAD_SOURCES if n in sources), None)
    if rows is None:
        raise ValueError("classifier_from_token: the checkpoint has neither lm head nor embeddings")
    if two_way(config):
        rows = (rows[1] - rows[0])[None]
    yield "score.weight", rows
