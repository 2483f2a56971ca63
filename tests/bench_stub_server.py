"""A tiny OpenAI-compatible streaming server for testing the serving benchmark client.

It answers ``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions`` with one chunk per
"token" (the word ``" the"``), a usage chunk when ``stream_options.include_usage`` is set, and
records what it received and how many requests were in flight at once.
"""

from __future__ import annotations

import asyncio
import json
import socket
from dataclasses import dataclass, field

from aiohttp import web

WORD = " the"
PROMPT_TOKENS = 7  # what the usage chunk reports, whatever the prompt


@dataclass
class StubState:
    send_usage: bool = True
    fail_every: int = 0  # answer every n-th request with HTTP 500 (0: never)
    bodies: list[dict] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0


def make_app(state: StubState) -> web.Application:
    async def models(_: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "stub-model"}]})

    async def complete(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        state.bodies.append(body)
        if state.fail_every and len(state.bodies) % state.fail_every == 0:
            return web.json_response({"error": {"message": "boom"}}, status=500)
        chat = request.path.endswith("chat/completions")
        state.in_flight += 1
        state.max_in_flight = max(state.max_in_flight, state.in_flight)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)

        async def send(obj: dict | str) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await response.write(f"data: {data}\n\n".encode())

        n = body["max_tokens"]
        for i in range(n):
            await asyncio.sleep(0.001)
            choice = {"index": 0, "finish_reason": "length" if i == n - 1 else None}
            if chat:
                choice["delta"] = {"content": WORD}
            else:
                choice["text"] = WORD
            await send({"object": "chunk", "choices": [choice]})
        if state.send_usage and (body.get("stream_options") or {}).get("include_usage"):
            await send(
                {"choices": [], "usage": {"prompt_tokens": PROMPT_TOKENS, "completion_tokens": n}}
            )
        await send("[DONE]")
        state.in_flight -= 1
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/completions", complete)
    app.router.add_post("/v1/chat/completions", complete)
    return app


class StubServer:
    """``async with StubServer(state) as base_url:`` serves on a free localhost port."""

    def __init__(self, state: StubState) -> None:
        self.state = state
        self._runner: web.AppRunner | None = None

    async def __aenter__(self) -> str:
        self._runner = web.AppRunner(make_app(self.state))
        await self._runner.setup()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        await web.SockSite(self._runner, sock).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()
