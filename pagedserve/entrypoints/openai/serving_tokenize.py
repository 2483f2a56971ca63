"""POST /tokenize and /detokenize, with vLLM's request and response shapes."""

from __future__ import annotations

from typing import Any

from pagedserve.entrypoints.openai.errors import bad_request
from pagedserve.entrypoints.openai.serving_base import OpenAIServing
from pagedserve.entrypoints.openai.tokenize_protocol import DetokenizeRequest, TokenizeRequest


class ServingTokenize:
    def __init__(self, serving: OpenAIServing) -> None:
        self.s = serving

    async def tokenize(self, req: TokenizeRequest) -> dict[str, Any]:
        s = self.s
        s.check_model(req.model)
        if req.messages is not None and req.prompt is not None:
            raise bad_request("give either prompt or messages, not both", param="messages")
        if req.messages is not None:
            text = s.render_chat(req, req.tools)
            add_special = False if req.add_special_tokens is None else req.add_special_tokens
        elif req.prompt is not None:
            text = req.prompt
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
        else:
            raise bad_request("give either prompt or messages", param="prompt")
        tokens = await s.tokenize(text, add_special)
        return {
            "count": len(tokens),
            "max_model_len": s.max_model_len,
            "tokens": tokens,
            "token_strs": s.tokenizer.convert_ids_to_tokens(tokens)
            if req.return_token_strs
            else None,
        }

    def detokenize(self, req: DetokenizeRequest) -> dict[str, Any]:
        s = self.s
        s.check_model(req.model)
        s.check_token_ids(req.tokens, "tokens")
        return {"prompt": s.tokenizer.decode(req.tokens)}
