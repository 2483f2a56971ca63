"""vLLM's ``return_prompt_text`` on chat: the answer carries ``prompt_text``, the prompt exactly
as the chat template wrote it (what the model read, before tokenizing), to inspect a template's
work; a stream sends it in its first chunk."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, PrivateAttr


class PromptTextField(BaseModel):
    """The request field, and the rendered prompt kept beside the request (the render endpoint
    reads it too, for ``return_token_offsets``)."""

    return_prompt_text: bool | None = None

    _prompt_text: str | None = PrivateAttr(default=None)

    def keep_prompt_text(self, text: str) -> None:
        self._prompt_text = text

    @property
    def rendered_prompt(self) -> str | None:
        """The prompt the chat template wrote, once it has been rendered."""
        return self._prompt_text

    def prompt_text_field(self) -> dict[str, Any]:
        """``{"prompt_text": ...}`` for an answer (or a stream's first chunk) that asked for it."""
        if not self.return_prompt_text or self._prompt_text is None:
            return {}
        return {"prompt_text": self._prompt_text}
