"""The body of ``POST /abort_requests`` (vLLM's)."""

from __future__ import annotations

from pagedserve.entrypoints.openai.request_body import RequestBody


class AbortRequestsRequest(RequestBody):
    """``request_ids``: the ids of the answers to abort (a chat completion's ``chatcmpl-...``,
    a response's ``resp_...``, as the server answered them); none or empty: every request."""

    request_ids: list[str] | str | None = None

    def ids(self) -> list[str] | None:
        if not self.request_ids:
            return None
        return [self.request_ids] if isinstance(self.request_ids, str) else self.request_ids
