"""Scores of text pairs, as vLLM's ``score`` and ``rerank`` give them: a cross-encoder reads each
pair as one input (``[CLS] a [SEP] b [SEP]``) and returns its relevance; an embedding model
embeds both texts and returns their cosine similarity."""

from __future__ import annotations

from typing import Any

import torch


def score_pairs(data_1: str | list[str], data_2: str | list[str]) -> list[tuple[str, str]]:
    """One text against many (``data_1`` a string or a list of one), or two lists pairwise;
    a ``ValueError`` for anything else."""
    first = [data_1] if isinstance(data_1, str) else list(data_1)
    second = [data_2] if isinstance(data_2, str) else list(data_2)
    if not first or not second:
        raise ValueError("text_1 and text_2 must not be empty")
    if len(first) == 1:
        first = first * len(second)
    if len(first) != len(second):
        raise ValueError(
            f"text_1 has {len(first)} texts and text_2 {len(second)}: give one text_1, or as "
            "many as text_2"
        )
    return list(zip(first, second, strict=True))


def pair_token_ids(tokenizer: Any, first: str, second: str, max_length: int | None) -> list[int]:
    """A cross-encoder's input for a pair, cut to ``max_length`` tokens when given: the longer
    text loses tokens first. Below the pair's special tokens (transformers then cuts nothing),
    the whole encoding is cut to ``max_length`` from the tokenizer's truncation side, as vLLM
    0.32 cuts it: a pair cut to 1 token is its ``[CLS]`` alone."""
    if max_length is None:
        return tokenizer(first, second)["input_ids"]
    if max_length < 1:
        raise ValueError("truncate_prompt_tokens must be >= 1")
    if max_length >= tokenizer.num_special_tokens_to_add(pair=True):
        return tokenizer(first, second, truncation=True, max_length=max_length)["input_ids"]
    ids = tokenizer(first, second)["input_ids"]
    return ids[-max_length:] if tokenizer.truncation_side == "left" else ids[:max_length]


def cosine(u: list[float], v: list[float]) -> float:
    a, b = torch.tensor(u), torch.tensor(v)
    return float(torch.nn.functional.cosine_similarity(a, b, dim=0))
