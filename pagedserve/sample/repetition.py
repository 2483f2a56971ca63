"""Ending an answer that has fallen into a loop (vLLM's ``repetition_detection``).

Small models, and any model sampled greedily, can repeat a phrase until ``max_tokens``. With
``RepetitionDetectionParams``, an answer whose last ``L`` tokens, for some ``L`` from
``min_pattern_size`` to ``max_pattern_size``, are the same ``L`` tokens ``min_count`` times in a
row stops there, with ``finish_reason`` ``"repetition"`` (vLLM's). Checked after each token, at
a cost of at most ``max_pattern_size x min_count`` comparisons.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RepetitionDetectionParams:
    """vLLM's fields: patterns of ``min_pattern_size`` (0: 1) to ``max_pattern_size`` tokens
    (0: off) repeated ``min_count`` (>= 2) times in a row."""

    max_pattern_size: int = 0
    min_pattern_size: int = 0
    min_count: int = 0

    def __post_init__(self) -> None:
        sizes = (self.max_pattern_size, self.min_pattern_size, self.min_count)
        if any(isinstance(v, bool) or not isinstance(v, int) for v in sizes):
            raise ValueError(
                "repetition_detection's max_pattern_size, min_pattern_size and min_count must "
                f"be integers, got {sizes}"
            )
        if self.max_pattern_size < 0 or not 0 <= self.min_pattern_size <= self.max_pattern_size:
            raise ValueError(
                "repetition_detection needs 0 <= min_pattern_size <= max_pattern_size, got "
                f"{self.min_pattern_size} and {self.max_pattern_size} (both 0: off)"
            )
        if self.max_pattern_size > 0 and self.min_count < 2:
            raise ValueError(
                f"repetition_detection.min_count must be >= 2, got {self.min_count} "
                "(max_pattern_size 0 turns detection off)"
            )


def ends_in_repetition(tokens: list[int], params: RepetitionDetectionParams) -> bool:
    """Whether ``tokens`` end with a pattern repeated ``min_count`` times in a row."""
    count = params.min_count
    for size in range(max(params.min_pattern_size, 1), params.max_pattern_size + 1):
        if size * count > len(tokens):
            return False
        tail = tokens[-size:]
        if all(tokens[-size * (k + 1) : len(tokens) - size * k] == tail for k in range(1, count)):
            return True
    return False
