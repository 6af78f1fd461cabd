"""One request's answer: whether the connection goes on, and the framing written."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.http import Answer, Handler, MalformedBody, Request
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

    return serving(handler)


def serving(handler: Handler) -> tuple[Connection, MemoryTransport]:
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


async def test_the_bookkeeping_runs_once_the_answer_is_written() -> None:
    seen: list[bytes] = []
    answer = Answer(200, {}, b"paid")

    async def then() -> None:
        seen.append(bytes(transport.written))

    answer.then = then
    conn, transport = answering(answer)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n")
    await settle()
    (written,) = seen
    assert written.endswith(b"\r\n\r\npaid")


async def test_a_failing_bookkeeping_leaves_the_connection_serving(
    caplog: pytest.LogCaptureFixture,
) -> None:
    answer = Answer(200, {}, b"ok")

    async def then() -> None:
        raise RuntimeError("the record store broke")

    answer.then = then
    conn, transport = answering(answer)
    conn.data_received(b"GET /1 HTTP/1.1\r\nHost: t\r\n\r\nGET /2 HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle()
    assert transport.take().count(b"HTTP/1.1 200 OK\r\n") == 2
    assert not transport.aborted and not transport.closed
    assert caplog.text.count("bookkeeping failed for GET /") == 2


async def test_the_bookkeeping_runs_when_the_client_has_gone() -> None:
    ran: list[bool] = []
    answer = Answer(200, {}, b"late")

    async def then() -> None:
        ran.append(True)

    answer.then = then
    gate = asyncio.Event()

    async def handler(req: Request) -> Answer:
        await gate.wait()
        return answer

    conn, transport = serving(handler)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle()
    conn.connection_lost(None)
    gate.set()
    await settle()
    assert ran == [True] and b"late" not in transport.written


async def test_the_bookkeeping_runs_when_the_answer_is_cancelled_midway() -> None:
    ran: list[bool] = []
    stuck = asyncio.Event()

    class Stuck(Pieces):
        async def iter_any(self) -> AsyncIterator[bytes]:
            yield b"a"
            await stuck.wait()
            yield b"b"

    answer = Answer(200, {}, b"", stream=Stuck(), length=2)

    async def then() -> None:
        ran.append(True)

    answer.then = then
    conn, transport = answering(answer)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle()
    (task,) = conn.server.tasks
    task.cancel()
    await settle()
    assert ran == [True] and transport.aborted
