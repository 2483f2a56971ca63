"""The server's listening socket: its connections send each response piece at once (no Nagle
delay waiting for the client's delayed ACK)."""

from __future__ import annotations

import asyncio
import socket

from pagedserve.entrypoints.openai.api_server import bind_socket


def test_accepted_connections_have_tcp_nodelay():
    listener = bind_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]

    async def main() -> int:
        accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

        def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            conn = writer.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            writer.close()

        server = await asyncio.start_server(on_connect, sock=listener)
        async with server:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            nodelay = await asyncio.wait_for(accepted, 10)
            writer.close()
        return nodelay

    assert asyncio.run(main()) != 0
