"""The base of every request body: unknown fields are ignored with a warning that names them,
as vLLM's, and a lone UTF-16 surrogate anywhere in the body is a 400 naming where."""

from __future__ import annotations

import logging
from functools import cache
from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationInfo, model_validator

from pagedserve.entrypoints.openai.errors import bad_request

logger = logging.getLogger(__name__)


class OpenAIModel(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIModel):
    include_usage: bool | None = False
    continuous_usage_stats: bool | None = False  # vLLM's: usage so far in every chunk


@cache
def _known_fields(model: type[BaseModel]) -> frozenset[str]:
    """The keys a request body of this model may hold: field names and their aliases."""
    fields = model.model_fields
    return frozenset(fields) | frozenset(f.alias for f in fields.values() if f.alias)


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string in ``value`` that holds a lone UTF-16 surrogate (JSON's
    ``"\\ud800"`` parses into one; it is not Unicode text, and tokenizers fail on it)."""
    if isinstance(value, str):
        if value.isascii():
            return None
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path
        return None
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list):
        items = ((i, v) for i, v in enumerate(value) if type(v) is not int)  # past token ids
    else:
        return None
    for key, item in items:
        where = f"{path}.{key}" if path else str(key)
        found = _lone_surrogate(key, where) if isinstance(key, str) else None
        found = found or _lone_surrogate(item, where)
        if found is not None:
            return found
    return None


class RequestBody(OpenAIModel):
    """A request's top-level body."""

    @model_validator(mode="before")
    @classmethod
    def _refuse_lone_surrogates(cls, data: Any) -> Any:
        where = _lone_surrogate(data, "")
        if where is not None:
            where = where.encode("utf-8", "backslashreplace").decode()  # a key may hold one
            raise bad_request(
                f"{where} holds a lone UTF-16 surrogate (such as \\ud800), which is not "
                "valid Unicode text",
                param=where.split(".")[0],
            )
        return data

    @model_validator(mode="before")
    @classmethod
    def _warn_ignored_fields(cls, data: Any, info: ValidationInfo) -> Any:
        """Unknown fields are ignored, as the OpenAI API does, with a warning that names them (as
        vLLM's): a misspelt parameter (``max_token``) should not pass unnoticed. A probe (which
        body type is this? see ``sagemaker``) does not warn."""
        if isinstance(data, dict) and not (info.context or {}).get("probe"):
            ignored = sorted(str(k) for k in data if k not in _known_fields(cls))
            if ignored:
                logger.warning("request fields ignored: %s", ", ".join(ignored))
        return data
