"""Request-level changes to the logits before the draw (or the argmax of greedy rows).

Order, as vLLM applies them: allowed tokens, logit bias, banned tokens (stop tokens below
min_tokens, bad words), repetition penalty, then frequency and presence penalties. Every function
works on the whole batch at once and changes ``logits`` ([B, V] float32) in place.
"""

from __future__ import annotations

import torch

from pagedserve.sample.metadata import Penalties, SamplingMetadata, SparseTokenValues, TokenMask


def apply_logits_processors(logits: torch.Tensor, meta: SamplingMetadata) -> torch.Tensor:
    """Apply every processor some row asked for; returns ``logits`` (changed in place)."""
    if meta.allowed is not None:
        apply_allowed_tokens(logits, meta.allowed)
    if meta.logit_bias is not None:
        apply_logit_bias(logits, meta.logit_bias)
    if meta.banned is not None:
        apply_token_ban(logits, meta.banned)
    if meta.penalties is not None:
        apply_penalties(logits, meta.penalties)
    return logits


def apply_allowed_tokens(logits: torch.Tensor, mask: TokenMask) -> None:
    """Set every token a row does not allow to -inf."""
    sub = logits[mask.rows]
    logits[mask.rows] = sub.masked_fill_(~mask.allowed, float("-inf"))


def apply_logit_bias(logits: torch.Tensor, bias: SparseTokenValues) -> None:
    """Add each row's bias to its tokens' logits (OpenAI ``logit_bias``)."""
    logits.index_put_((bias.rows, bias.tokens), bias.values, accumulate=True)


def apply_token_ban(logits: torch.Tensor, ban: SparseTokenValues) -> None:
    """Make the listed (row, token) pairs impossible."""
    logits[ban.rows, ban.tokens] = float("-inf")


def apply_penalties(logits: torch.Tensor, pen: Penalties) -> None:
    """Repetition penalty (HF/vLLM: over prompt and output tokens, a positive logit is divided by
    the factor and a negative one multiplied), then frequency and presence penalties (OpenAI: over
    output tokens, ``logit -= frequency * count + presence * (count > 0)``)."""
    if pen.repetition is not None:
        rows, tokens, factor = pen.repetition
        values = logits[rows, tokens]
        logits[rows, tokens] = torch.where(values > 0, values / factor, values * factor)
    if pen.frequency_presence is not None:
        rows, tokens, amount = pen.frequency_presence
        logits.index_put_((rows, tokens), -amount, accumulate=True)
