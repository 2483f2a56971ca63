"""POST /v1/messages and /v1/messages/count_tokens: Anthropic's Messages API over the chat path.

The request becomes a chat request (``chat_request``) and is served by the chat path's checks,
template, tool calls, reasoning split and engine; the answer is written as Anthropic's
``message`` (``answer``), or streamed as Anthropic's events (``message_stream``).
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagedserve.entrypoints.anthropic.answer import Answer
from pagedserve.entrypoints.anthropic.chat_request import chat_request
from pagedserve.entrypoints.anthropic.message_stream import events
from pagedserve.entrypoints.anthropic.protocol import CountTokensRequest, MessagesRequest
from pagedserve.entrypoints.openai.errors import APIError
from pagedserve.entrypoints.openai.protocol import ChatCompletionRequest
from pagedserve.entrypoints.openai.serving_chat import ServingChat
from pagedserve.entrypoints.openai.streams import SSEResponse, cancel_on_disconnect, last_output


class ServingMessages:
    def __init__(self, chat: ServingChat) -> None:
        self.chat = chat
        self._merges_inline_system: bool | None = None  # found out at the first request

    def merges_inline_system(self) -> bool:
        """Whether the chat template allows a system message only first (Qwen's, among
        others): it is made to render one after a user turn, once."""
        if self._merges_inline_system is None:
            s = self.chat.s
            turns = [{"role": r, "content": "t"} for r in ("system", "user", "system", "user")]
            probe = ChatCompletionRequest(
                model=s.model_name, messages=turns, add_generation_prompt=False
            )
            try:
                s.render_chat(probe)
                self._merges_inline_system = False
            except APIError:
                self._merges_inline_system = True
        return self._merges_inline_system

    def chat_request(self, req: CountTokensRequest) -> ChatCompletionRequest:
        """The chat request of ``req``, once its model is known to be served (an unknown model
        is a 404 whatever else is wrong)."""
        s = self.chat.s
        s.check_model(req.model)
        merge = self.merges_inline_system()
        return chat_request(req, s.reasoning is not None, s.max_model_len, merge)

    async def create(self, req: MessagesRequest, raw: Request) -> Response:
        s = self.chat.s
        chat_req = self.chat_request(req)
        prompt_ids, params = await self.chat.prepare(chat_req)
        answer = Answer(self.chat, chat_req, req)
        if req.stream:
            stream = (await s.submit_all(answer.id, [prompt_ids], [params], chat_req))[0]
            return SSEResponse(events(answer, stream), stream.abort)

        async def run() -> Response:
            stream = (await s.submit_all(answer.id, [prompt_ids], [params], chat_req))[0]
            return JSONResponse(answer.message(await last_output(stream)))

        return await cancel_on_disconnect(raw, run)

    async def count_tokens(self, req: CountTokensRequest) -> dict[str, int]:
        """The prompt's length in tokens, as ``/v1/messages`` would run it (its template and
        tools); a prompt longer than the context is counted too, so that a client learns how
        far to shorten it."""
        s = self.chat.s
        chat_req = self.chat_request(req)
        chat_req.resolve_tools(s.tool_parser)
        text = s.render_chat(chat_req, chat_req.tools)
        return {"input_tokens": len(await s.tokenize(text, chat_req.add_special_tokens))}
