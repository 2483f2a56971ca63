"""vLLM's request fields that pagedserve has no machinery for, made explicit.

vLLM accepts each of these on /v1/chat/completions and /v1/completions. Here each one is either

* accepted and does nothing, where vLLM too does nothing with it on a server like this one (no
  watermark configured, no KV events published, no custom logits processors, no multimodal
  model, not a render endpoint), so a client that always sends it keeps working; or
* refused with a 400 naming it, where vLLM would act on it and this server cannot (disaggregated
  prefill and encoder-cache transfer, prompt embeddings): a client must not believe its prefill
  was handed over, or its embeddings read, when they were not.

Their types are checked as vLLM checks them, so a malformed value is a 400 either way.
"""

from __future__ import annotations

import logging
from functools import cache
from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from pagedserve.entrypoints.openai.errors import bad_request

logger = logging.getLogger(__name__)

XArg = str | int | float | list[str | int | float]


class InertFields(BaseModel):
    """The fields both endpoints share."""

    # Whether the server's watermark applies; this server has none (vLLM without
    # --watermark-config warns and generates unwatermarked text too).
    watermarking: bool | None = None
    # Labels the request's KV-cache events for external routers; no events are published here.
    session_id: str | None = None
    # Free-form data for custom logits processors and other extensions; there are none here.
    vllm_xargs: dict[str, XArg] | None = None
    # Which prompt tokens' routed experts to return; MoE expert routing is never returned here.
    routed_experts_prompt_start: int = Field(default=0, ge=0)
    # Options of the /render endpoints, which vLLM's generation endpoints ignore too; the render
    # endpoints here honour return_token_offsets (render.py), and have no media for the others.
    return_token_offsets: bool | None = False
    mm_payload: Literal["tensors", "none"] = "tensors"
    return_mm_kwargs: bool | None = None
    # Disaggregated serving: a KV connector (or encoder-cache connector) would send or fetch the
    # request's cache. This server has none, so a non-empty value is refused.
    kv_transfer_params: dict[str, Any] | None = None
    ec_transfer_params: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _refuse_transfers(self) -> InertFields:
        for name in ("kv_transfer_params", "ec_transfer_params"):
            if getattr(self, name):
                raise bad_request(
                    f"{name} is not supported: this server has no KV connector for "
                    "disaggregated serving, so it can neither send nor receive a request's cache",
                    param=name,
                )
        if self.watermarking:
            _warn_no_watermark()
        return self


@cache
def _warn_no_watermark() -> None:
    """Once per process, as vLLM warns."""
    logger.warning(
        "a request asked for watermarking, but this server has no watermark: it and later such "
        "requests are generated without one"
    )


class ChatInertFields(InertFields):
    """Chat's own: options for media inputs, which a text-only model never receives (a message
    part other than text is already a 400)."""

    media_io_kwargs: dict[str, dict[str, Any]] | None = None
    mm_processor_kwargs: dict[str, Any] | None = None


class CompletionInertFields(InertFields):
    """Completions' own: ``prompt_embeds``, the prompt as embeddings instead of tokens (vLLM takes
    them only with --enable-prompt-embeds), refused before the missing ``prompt`` is noticed."""

    prompt_embeds: bytes | list[bytes] | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_prompt_embeds(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("prompt_embeds") is not None:
            raise bad_request(
                "prompt_embeds is not supported: send the prompt as text or token ids",
                param="prompt_embeds",
            )
        return data
