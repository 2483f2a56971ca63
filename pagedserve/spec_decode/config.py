"""``speculative_config``: vLLM's dictionary, checked once at engine start."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

_KEYS = {
    "method",
    "num_speculative_tokens",
    "prompt_lookup_max",
    "prompt_lookup_min",
    "disable_by_batch_size",
}


@dataclass(frozen=True)
class SpeculativeConfig:
    """Prompt-lookup (n-gram) speculation: each step, a decoding sequence whose last n tokens
    (n from ``prompt_lookup_max`` down to ``prompt_lookup_min``) occurred earlier in its prompt
    or output proposes the ``num_speculative_tokens`` tokens that followed them there. With
    more than ``disable_by_batch_size`` sequences running, none does: each draft is a row more
    in the step, which pays where a step's cost is reading the weights (few rows) and not
    where it is arithmetic (many)."""

    num_speculative_tokens: int
    prompt_lookup_max: int
    prompt_lookup_min: int
    disable_by_batch_size: int | None = None

    @classmethod
    def parse(cls, config: dict[str, Any]) -> SpeculativeConfig:
        """From vLLM's form, ``{"method": "ngram", "num_speculative_tokens": 4,
        "prompt_lookup_max": 4, "prompt_lookup_min": 2}``. As in vLLM, a missing lookup bound
        takes the other's value, and both default to 5."""
        unknown = set(config) - _KEYS
        if unknown:
            raise ValueError(
                f"speculative_config: unknown keys {sorted(unknown)}; known: {sorted(_KEYS)}"
            )
        method = config.get("method", "ngram")
        if method != "ngram":
            raise ValueError(
                f"speculative_config: method {method!r} is not supported; only 'ngram' "
                "(prompt lookup) is, which needs no draft model"
            )
        k = config.get("num_speculative_tokens")
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError("speculative_config: num_speculative_tokens must be an integer >= 1")
        high = config.get("prompt_lookup_max")
        low = config.get("prompt_lookup_min")
        if high is None and low is None:
            high = low = 5
        high = low if high is None else high
        low = high if low is None else low
        for name, value in (("prompt_lookup_min", low), ("prompt_lookup_max", high)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"speculative_config: {name} must be an integer >= 1")
        if low > high:
            raise ValueError("speculative_config: prompt_lookup_min exceeds prompt_lookup_max")
        limit = config.get("disable_by_batch_size")
        if limit is not None and (
            not isinstance(limit, int) or isinstance(limit, bool) or limit < 1
        ):
            raise ValueError("speculative_config: disable_by_batch_size must be an integer >= 1")
        return cls(k, high, low, limit)
