"""One request's answer: whether the connection goes on, and the framing written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.http import Answer, MalformedBody, Request
from proxy.server import ProxyServer
from proxy.server.connection import Connection
from proxy.server.cycle import keep
from tests.unit.server.memory import MemoryTransport, connection, settle


class Pieces:
    def __init__(self, *parts: bytes) -> None:
        self.parts = parts
        self.released = False

    async def iter_any(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            yield part

    def release(self) -> None:
        self.released = True


def answering(answer: Answer) -> tuple[Connection, MemoryTransport]:
    async def handler(req: Request) -> Answer:
        return answer

    server = ProxyServer(handler, lambda: 1024)
    server.loop = asyncio.get_running_loop()
    conn = Connection(server)
    transport = MemoryTransport()
    conn.connection_made(transport)
    return conn, transport


@pytest.mark.parametrize(
    ("change", "kept"),
    [
        ("", True),
        ("keep_alive", False),
        ("complete", False),
        ("over_cap", False),
        ("error", False),
        ("draining", False),
    ],
    ids=["kept", "client-says-close", "body-unread", "over-cap", "body-error", "draining"],
)
async def test_whether_the_connection_carries_another_request(change: str, kept: bool) -> None:
    conn, _transport, gate = connection()
    gate.open.clear()
    conn.data_received(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle()
    (req,) = gate.seen
    if change == "keep_alive":
        req.keep_alive = False
    elif change == "complete":
        req.complete = False
    elif change == "over_cap":
        req.over_cap = True
    elif change == "error":
        req.error = MalformedBody("x")
    elif change == "draining":
        conn.server.drain()
    assert keep(conn, req) is kept


@pytest.mark.parametrize(
    ("request_line", "answer", "expected"),
    [
        (b"GET / HTTP/1.1", Answer(200, {}, b"abc"), b"Content-Length: 3\r\n"),
        (b"HEAD / HTTP/1.1", Answer(200, {}, b"abc"), b"Date: "),
        (b"GET / HTTP/1.1", Answer(204, {}), b"HTTP/1.1 204 No Content\r\n"),
        (
            b"GET / HTTP/1.1",
            Answer(200, {}, b"a", stream=Pieces(b"b", b"", b"c")),
            b"Transfer-Encoding: chunked\r\n",
        ),
        (
            b"GET / HTTP/1.1",
            Answer(200, {}, b"a", stream=Pieces(b"bc"), length=3),
            b"Content-Length: 3\r\n",
        ),
    ],
    ids=["whole", "head", "no-content", "chunked", "streamed-length"],
)
async def test_answers_are_framed(request_line: bytes, answer: Answer, expected: bytes) -> None:
    conn, transport = answering(answer)
    conn.data_received(request_line + b"\r\nHost: t\r\n\r\n")
    await settle()
    out = transport.take()
    assert expected in out
    if request_line.startswith(b"HEAD") or answer.status == 204:
        assert out.endswith(b"\r\n\r\n") and b"Content-Length" not in out
    elif b"chunked" in expected:
        assert out.endswith(b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n")
    else:
        assert out.endswith(b"\r\n\r\nabc")


async def test_an_http_1_0_stream_without_length_ends_with_the_connection() -> None:
    stream = Pieces(b"xyz")
    conn, transport = answering(Answer(200, {}, stream=stream))
    conn.data_received(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
    await settle()
    out = transport.take()
    assert b"Connection: close\r\n" in out and out.endswith(b"\r\n\r\nxyz")
    assert stream.released and conn.last_answer
