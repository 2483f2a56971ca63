"""The range vLLM 0.32 holds a request's ``priority`` to: a signed 64-bit integer. A value outside
it (which Python's ints would otherwise carry to the scheduler) is a 400 naming ``priority``,
whether it comes in the body or in the ``X-Vllm-Priority`` header."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from pagedserve.entrypoints.openai.errors import bad_request

MIN_PRIORITY = -(2**63)
MAX_PRIORITY = 2**63 - 1

# A body's ``priority`` field: pydantic's 400 names it for a value out of range.
Priority = Annotated[int, Field(ge=MIN_PRIORITY, le=MAX_PRIORITY)]


def check_priority_range(priority: int) -> int:
    """``priority``, or a 400 naming it when it is outside the signed 64-bit range."""
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise bad_request(
            f"priority must be a 64-bit integer, from {MIN_PRIORITY} to {MAX_PRIORITY}; "
            f"got {priority}",
            param="priority",
        )
    return priority
