"""What makes a request one the engine can never run: each check raises ``ValueError`` with the
message the API hands back as a 400."""

from __future__ import annotations

from pagedserve.pooling_params import PoolingParams
from pagedserve.sampling_params import SamplingParams


def check_task(params: SamplingParams | PoolingParams, pooling: bool) -> None:
    """Embeddings from a pooling engine, completions from a generating one."""
    if isinstance(params, PoolingParams) and not pooling:
        raise ValueError(
            "this model runs for generation, not embeddings; run it with --runner pooling "
            '(LLM(..., runner="pooling")) for embeddings'
        )
    if not isinstance(params, PoolingParams) and pooling:
        raise ValueError(
            "this model runs as an embedding model (runner pooling): it does not generate "
            "text; run it with --runner generate for completions"
        )


def check_token_ids(token_ids: list[int], vocab_size: int) -> None:
    if not token_ids:
        raise ValueError("the prompt is empty")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        raise ValueError(f"prompt token ids must be in [0, {vocab_size})")


def resolve_max_logprobs(max_logprobs: int, vocab_size: int) -> int:
    """The engine's ``max_logprobs``: -1 (or more than it holds) is the whole vocabulary."""
    if max_logprobs < -1:
        raise ValueError("max_logprobs must be >= 0, or -1 for the whole vocabulary")
    return vocab_size if max_logprobs == -1 else min(max_logprobs, vocab_size)


def check_logprobs(params: SamplingParams, max_logprobs: int) -> None:
    """The alternatives a request asks for, against the engine's ``max_logprobs``."""
    for name in ("logprobs", "prompt_logprobs"):
        value = getattr(params, name)
        if value is not None and value > max_logprobs:
            raise ValueError(f"{name} {value} is more than this engine returns: {max_logprobs}")


def check_prompt(
    token_ids: list[int], params: SamplingParams, vocab_size: int, max_model_len: int
) -> None:
    """A completion's prompt and the token ids its parameters name, against the vocabulary and
    the context length (the prompt plus at least one token, or plus ``max_tokens``)."""
    check_token_ids(token_ids, vocab_size)
    for name, ids in (
        ("allowed_token_ids", params.allowed_token_ids or []),
        ("logit_bias", list(params.logit_bias or {})),
        ("logprob_token_ids", params.logprob_token_ids or []),
    ):
        if any(not 0 <= t < vocab_size for t in ids):
            raise ValueError(f"{name} has token ids outside the vocabulary [0, {vocab_size})")
    n = len(token_ids)
    if n >= max_model_len:
        raise ValueError(
            f"the prompt has {n} tokens; this model's maximum context length is "
            f"{max_model_len} and at least one token must be generated"
        )
    if params.max_tokens is not None and n + params.max_tokens > max_model_len:
        raise ValueError(
            f"the prompt ({n} tokens) plus max_tokens ({params.max_tokens}) exceeds the "
            f"maximum context length of {max_model_len} tokens"
        )
