"""The rule vLLM 0.32 holds a request's ``cache_salt`` to: a non-empty string of at most 128
characters, none of them ``@``, ``/``, ``\\`` or NUL (cache backends build keys and paths from
it). A salt outside it is a 400 on chat, completions and the Responses API, as there."""

from __future__ import annotations

from pagedserve.entrypoints.openai.errors import bad_request

MAX_CACHE_SALT_LENGTH = 128
FORBIDDEN_CACHE_SALT_CHARS = frozenset("@/\\\x00")


def check_cache_salt(salt: str | None) -> None:
    """A 400 naming ``cache_salt`` for a salt outside the rule; None (no salt) passes."""
    if salt is None:
        return
    if not salt:
        raise bad_request("cache_salt must be a non-empty string", param="cache_salt")
    if len(salt) > MAX_CACHE_SALT_LENGTH:
        raise bad_request(
            f"cache_salt must be at most {MAX_CACHE_SALT_LENGTH} characters, got {len(salt)}",
            param="cache_salt",
        )
    if any(char in FORBIDDEN_CACHE_SALT_CHARS for char in salt):
        raise bad_request(
            "cache_salt must not hold '@', '/', '\\' or a NUL character", param="cache_salt"
        )
