"""The bodies of a pooling model's endpoints: ``POST /v1/embeddings`` (OpenAI's fields, vLLM's
extras, and vLLM's chat form, which embeds a conversation as the chat template writes it), and
vLLM's ``/score``, ``/rerank`` (Jina's and Cohere's rerank shape) and ``/classify``.

Each takes vLLM's ``priority`` and ``cache_salt``; the salt is held to the same rule as on chat
(see ``cache_salt``) and salts the prompt's cached prefix blocks, as it does for generation."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import model_validator

from pagedserve.entrypoints.openai.cache_salt import check_cache_salt
from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.priority import Priority
from pagedserve.entrypoints.openai.protocol import ChatMessage, Prompt
from pagedserve.entrypoints.openai.request_body import RequestBody


class PoolingFields(RequestBody):
    """vLLM's extras that every pooling body takes."""

    priority: Priority = 0
    cache_salt: str | None = None

    @model_validator(mode="after")
    def _check_cache_salt(self) -> PoolingFields:
        check_cache_salt(self.cache_salt)
        return self


class EmbeddingRequest(PoolingFields):
    model: str | None = None
    input: Prompt | None = None
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None
    # vLLM extras
    embed_dtype: Literal["float32", "float16", "bfloat16", "fp8_e4m3", "fp8_e5m2"] = "float32"
    endianness: Literal["native", "big", "little"] = "native"  # with embed_dtype: base64's bytes
    messages: list[ChatMessage] | None = None
    add_generation_prompt: bool = False
    continue_final_message: bool = False
    chat_template: str | None = None
    chat_template_kwargs: dict[str, Any] | None = None
    add_special_tokens: bool | None = None  # default: True for input, False for messages
    truncate_prompt_tokens: int | None = None
    truncation_side: Literal["left", "right"] | None = None
    normalize: bool | None = None

    def inputs(self) -> list[str | list[int]]:
        """``input`` as a list of strings or token-id lists, one per embedding."""
        given = self.input
        if given is None:
            raise bad_request("input is required (or, vLLM's chat form, messages)", param="input")
        if isinstance(given, str):
            return [given]
        if not given:
            raise bad_request("input must not be empty", param="input")
        if isinstance(given[0], int):
            return [list(given)]  # type: ignore[arg-type]
        return list(given)  # type: ignore[arg-type]


class PoolingRequest(EmbeddingRequest):
    """vLLM's ``/pooling``: an embeddings body and the ``task`` the model is to pool for
    (``embed`` or ``classify``; the model's own when left out)."""

    task: str | None = None


class ScoreRequest(PoolingFields):
    """vLLM's ``/score``: ``text_1`` (one text, or one per ``text_2`` text) against ``text_2``."""

    model: str | None = None
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: int | None = None


class RerankRequest(PoolingFields):
    """``/rerank``: the ``documents`` by relevance to ``query``, best first, ``top_n`` of them."""

    model: str | None = None
    query: str
    documents: list[str]
    top_n: int | None = None  # None or 0: all
    truncate_prompt_tokens: int | None = None


class ClassifyRequest(PoolingFields):
    """vLLM's ``/classify``: each input's class probabilities."""

    model: str | None = None
    input: str | list[str]
    truncate_prompt_tokens: int | None = None
