"""An in-memory asyncio transport, so one listener connection can be driven byte by byte
with the clock in the test's hands (the sweep takes `now`)."""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.http import Answer, Request
from proxy.server import ConnectionCap, ProxyServer
from proxy.server.connection import Connection, Phase


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.reading = True
        self.closed = False
        self.eof_written = False
        self.aborted = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def pause_reading(self) -> None:
        self.reading = False

    def resume_reading(self) -> None:
        self.reading = True

    def is_reading(self) -> bool:
        return self.reading

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        self.eof_written = True

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def abort(self) -> None:
        self.aborted = True

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 50000) if name == "peername" else default

    def was_closed(self) -> bool:
        return self.closed

    def was_aborted(self) -> bool:
        return self.aborted

    def take(self) -> bytes:
        data = bytes(self.written)
        self.written.clear()
        return data


class Gate:
    """A handler that holds each request until released, reading its body first."""

    def __init__(self) -> None:
        self.seen: list[Request] = []
        self.open = asyncio.Event()
        self.open.set()

    async def __call__(self, req: Request) -> Answer:
        self.seen.append(req)
        body = await req.read(1024)
        await self.open.wait()
        return Answer(200, {}, b"ok:" + body)


def connection(
    cap: ConnectionCap | None = None, /, **kw: float
) -> tuple[Connection, MemoryTransport, Gate]:
    """A connection made on a listener that was never started, over a memory transport."""
    gate = Gate()
    server = ProxyServer(gate, lambda: 1024, cap, **kw)
    server.loop = asyncio.get_running_loop()
    conn = Connection(server)
    transport = MemoryTransport()
    conn.connection_made(transport)
    return conn, transport, gate


def phase(conn: Connection) -> Phase:
    """The connection's phase, read afresh (not narrowed by an earlier assert)."""
    return conn.phase


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)
