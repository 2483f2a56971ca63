"""vLLM's -1 for ``logprobs`` (completions), ``top_logprobs`` (chat) and ``prompt_logprobs``:
the alternatives of the whole vocabulary, which a server returns only when started with
``--max-logprobs -1``; elsewhere a 400 that says so (vLLM's answer too, in its own words)."""

from __future__ import annotations

from typing import Any

from pagedserve.entrypoints.openai.errors import bad_request

FIELDS = ("logprobs", "top_logprobs", "prompt_logprobs")


def resolve_whole_vocabulary(req: Any, vocab_size: int, max_logprobs: int) -> None:
    """Replace a -1 in ``req``'s logprobs fields by the number of alternatives that is the whole
    vocabulary here (``max_logprobs``, the engine's, when it covers the tokenizer's
    ``vocab_size``); a 400 naming the field where the server returns fewer."""
    for name in FIELDS:
        value = getattr(req, name, None)
        if isinstance(value, bool) or value != -1:
            continue
        if max_logprobs < vocab_size:
            raise bad_request(
                f"{name} -1 asks for the whole vocabulary ({vocab_size} tokens); this server "
                f"returns at most {max_logprobs} (start it with --max-logprobs -1)",
                param=name,
            )
        setattr(req, name, max_logprobs)
