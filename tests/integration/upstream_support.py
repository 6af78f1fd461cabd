"""Real loopback gateways for the upstream client's tests: aiohttp gateways for ordinary
traffic and raw asyncio servers that script the edge cases byte by byte, and `attempt`, one
`Forwarder.start` awaited."""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import ssl
import struct
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import Gateway
from proxy.forward import BUFFER_LIMIT, AttemptFailed, Forwarder, Reply
from proxy.upstream.client import Origin, UpstreamClient
from proxy.upstream.phase import Progress
from tests.unit.upstream.health_support import gateway

HOST = "127.0.0.1"
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
BIG = 3 * 1024 * 1024
HEAD_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 1234\r\n\r\n"


# -- raw scripted servers -------------------------------------------------------------------


@dataclass
class Raw:
    """A raw server's view of what the client did."""

    port: int
    connections: int = 0
    requests: list[bytes] = field(default_factory=list)
    ended: int = 0  # connections over (the client hung up or the script ended them)
    stop: Callable[[], None] = lambda: None  # a restart: stop listening, close every connection

    @property
    def origin(self) -> Origin:
        return ("http", HOST, self.port)


Serve = Callable[[Raw, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> bytes | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
    return head + (await reader.readexactly(int(length.group(1))) if length else b"")


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP RST, as a crashing gateway does."""
    writer.get_extra_info("socket").setsockopt(
        socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
    )
    writer.transport.abort()


def answering(*answers: bytes, then: str = "wait") -> Serve:
    """Answer requests in turn, whichever connection they come on; when the script is done,
    wait for the client to hang up, close, or reset the connection on the next request."""
    script = list(answers)

    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while script:
            request = await read_request(reader)
            if request is None:
                return
            raw.requests.append(request)
            writer.write(script.pop(0))
            await writer.drain()
        if then == "close":
            writer.close()
        elif then == "reset" and await read_request(reader) is not None:
            reset(writer)

    return serve


@contextlib.asynccontextmanager
async def raw_server(serve: Serve) -> AsyncIterator[Raw]:
    tasks: set[asyncio.Task[Any]] = set()
    writers: list[asyncio.StreamWriter] = []
    raw = Raw(port=0)

    async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        tasks.add(task)
        writers.append(writer)
        raw.connections += 1
        try:
            with contextlib.suppress(ConnectionError):
                await serve(raw, reader, writer)
                await reader.read()
            raw.ended += 1
        finally:
            writer.close()

    server = await asyncio.start_server(accepted, HOST, 0)
    raw.port = server.sockets[0].getsockname()[1]

    def stop() -> None:
        server.close()
        for writer in writers:
            writer.close()

    raw.stop = stop
    try:
        yield raw
    finally:
        server.close()
        for writer in writers:
            writer.transport.abort()  # every handler's read then ends
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


# -- an aiohttp gateway ---------------------------------------------------------------------


async def echo(request: web.Request) -> web.Response:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    body = await request.read()
    return web.json_response(
        {"port": peer[1] if peer else None, "size": len(body), "host": request.host}
    )


async def big(request: web.Request) -> web.Response:
    return web.Response(body=b"x" * BIG)


async def chunked(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse()
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    size = int(request.query.get("size", "30"))
    for _ in range(3):
        await resp.write(b"y" * (size // 3))
    await resp.write_eof()
    return resp


@contextlib.asynccontextmanager
async def aiohttp_gateway(tls: ssl.SSLContext | None = None) -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_route("*", "/echo", echo)
    app.router.add_get("/big", big)
    app.router.add_get("/chunked", chunked)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, 0, ssl_context=tls)
    await site.start()
    try:
        yield next(iter(runner.addresses))[1]
    finally:
        await runner.cleanup()


async def attempt(
    client: UpstreamClient,
    port: int,
    path: str = "/echo",
    *,
    method: str = "POST",
    body: bytes = b'{"amount": 100}',
    connect_timeout: float = 1.0,
    within: float = 5.0,
    gw: Gateway | None = None,
    progress: Progress | None = None,
) -> Reply:
    """One attempt through the forwarder's one entry point; AttemptFailed raised."""
    result = await Forwarder(client).start(
        gw or gateway(port=port),
        method,
        path,
        CIMultiDict(),
        body,
        connect_timeout=connect_timeout,
        within=within,
        progress=progress,
    )
    if isinstance(result, AttemptFailed):
        raise result
    return result


async def failure(client: UpstreamClient, port: int, **kw: Any) -> AttemptFailed:
    with pytest.raises(AttemptFailed) as caught:
        await attempt(client, port, **kw)
    return caught.value


__all__ = [
    "BIG",
    "BUFFER_LIMIT",
    "HEAD_ANSWER",
    "HOST",
    "OK",
    "Origin",
    "Raw",
    "aiohttp_gateway",
    "answering",
    "attempt",
    "failure",
    "raw_server",
    "read_request",
    "reset",
]
