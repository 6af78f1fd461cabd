"""Peeking at unread client bytes and resetting, on real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib

from proxy.server.sockets import has_unread, reset


async def test_unread_bytes_are_seen_without_being_taken_and_a_reset_is_a_reset() -> None:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[asyncio.Transport] = loop.create_future()

    class Quiet(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            assert isinstance(transport, asyncio.Transport)
            transport.pause_reading()  # the bytes stay in the socket
            accepted.set_result(transport)

    server = await loop.create_server(Quiet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        transport = await asyncio.wait_for(accepted, 5)
        assert not has_unread(transport)
        writer.write(b"GET")
        await writer.drain()
        for _ in range(100):
            if has_unread(transport):
                break
            await asyncio.sleep(0.01)
        assert has_unread(transport) and has_unread(transport), "peeking takes nothing"
        reset(transport)
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(1), 5) == b""
    finally:
        writer.close()
        server.close()
        await server.wait_closed()
