"""vLLM's ``logprob_token_ids``: at each generated position, the logprobs of these tokens (and of
the one sampled) in place of the most likely ones, for scoring a fixed set of labels without
asking for the whole vocabulary. It needs logprobs asked for (``logprobs: true`` on chat, a
number on completions); beam search, which ranks the model's own best tokens, and an echo that
generates nothing (``max_tokens: 0``) refuse it, as in vLLM."""

from __future__ import annotations

from pydantic import BaseModel, model_validator

from pagedserve.entrypoints.openai.errors import bad_request


class LogprobTokenIdsField(BaseModel):
    """The request field, shared by chat and completions (an empty list: not given)."""

    logprob_token_ids: list[int] | None = None

    @model_validator(mode="after")
    def _check_logprob_token_ids(self) -> LogprobTokenIdsField:
        if not self.logprob_token_ids:
            return self
        if getattr(self, "use_beam_search", False):
            raise bad_request(
                "logprob_token_ids is not supported with use_beam_search",
                param="logprob_token_ids",
            )
        if getattr(self, "echo", False) and getattr(self, "max_tokens", None) == 0:
            raise bad_request(
                "logprob_token_ids is not supported with echo and max_tokens 0: no token is "
                "generated to score",
                param="logprob_token_ids",
            )
        logprobs = getattr(self, "logprobs", None)
        if logprobs is None or logprobs is False:  # 0 asks for them on completions
            raise bad_request(
                "logprob_token_ids needs logprobs (true on chat completions, a number on "
                "completions)",
                param="logprob_token_ids",
            )
        return self
