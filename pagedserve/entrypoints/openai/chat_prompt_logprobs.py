"""How many alternatives a chat answer's ``prompt_logprobs`` (vLLM's extra, at the top of the
answer) holds per prompt token, or None when it holds none.

vLLM 0.32 gives chat's ``echo`` the prompt's logprobs: without an explicit ``prompt_logprobs``,
an echo asks for them with ``top_logprobs`` alternatives (0, the prompt token alone, when not
given). They cover the whole rendered prompt, the first token null, and come only in a whole
answer: a stream never carries them, so a streamed echo asks the engine for none."""

from __future__ import annotations

from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest


def chat_prompt_logprobs(req: ChatCompletionRequest) -> int | None:
    """The explicit ``prompt_logprobs``, else an echo's ``top_logprobs`` (or 0); None in a
    stream. Read after ``top_logprobs`` is checked and its -1 resolved."""
    if req.stream:
        return None
    if req.prompt_logprobs is not None:
        return req.prompt_logprobs
    if req.echo:
        return req.top_logprobs or 0
    return None
