"""One upstream connection, driven by hand over a socketpair and a recording transport: how
far the exchange got (Progress), whether an idle connection is already closed, and what a
loss before any answer byte allows."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest

from proxy.upstream.client import UpstreamClient
from proxy.upstream.connection import Connection
from proxy.upstream.phase import Phase, Progress
from proxy.upstream.response import ConnectionLost, Response, UpstreamError

OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


class Transport(asyncio.Transport):
    """Records writes; `buffered` is what the kernel did not take yet."""

    def __init__(self, buffered: int = 0) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.buffered = buffered
        self.closing = False
        self.high: int | None = None

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self.high = high

    def get_write_buffer_size(self) -> int:
        return self.buffered

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield ours, theirs
    ours.close()
    theirs.close()


def connection(ours: socket.socket, transport: Transport, port: int = 80) -> Connection:
    pool = UpstreamClient().pool(("http", "127.0.0.1", port))
    pool.open += 1
    conn = Connection(pool, ours)
    conn.connection_made(transport)
    return conn


def _same(value: Response | UpstreamError) -> Response | UpstreamError:
    return value


def begin(conn: Connection, progress: Progress) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    conn.exchange(
        fut,
        b"GET / HTTP/1.1\r\n\r\n",
        head_only=False,
        limit=10,
        within=5,
        convert=_same,
        progress=progress,
    )
    return fut


def phase_of(progress: Progress) -> Phase:
    return progress.phase


@pytest.mark.parametrize(
    ("buffered", "after_write"),
    [(0, Phase.SENT), (10, Phase.WRITING)],
    ids=["written-in-one-call", "left-in-the-buffer"],
)
async def test_progress(
    pair: tuple[socket.socket, socket.socket], buffered: int, after_write: Phase
) -> None:
    transport = Transport(buffered)
    conn = connection(pair[0], transport)
    assert transport.high == 0  # told the moment the buffer empties
    progress = Progress()
    fut = begin(conn, progress)
    assert phase_of(progress) is after_write
    conn.resume_writing()  # the buffer drained
    assert phase_of(progress) is Phase.SENT
    conn.data_received(b"HTTP/1.1 100 Continue\r\n\r\n")
    assert phase_of(progress) is Phase.SENT  # an interim answer is not the answer
    conn.data_received(OK)
    assert phase_of(progress) is Phase.ANSWERED
    assert isinstance(await fut, Response)


async def test_the_waker_is_told_once_the_outcome_is_set(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    conn = connection(pair[0], Transport())
    progress = Progress()
    seen: list[bool] = []
    fut = begin(conn, progress)
    progress.waker = lambda: seen.append(fut.done())
    conn.data_received(OK[:20])
    assert seen == []  # part of the head: nothing to wake for yet
    conn.data_received(OK[20:])
    assert seen == [True]  # after the result, in the same call
    assert isinstance(await fut, Response)


async def test_an_outcome_without_a_waker_is_only_the_future(
    pair: tuple[socket.socket, socket.socket],
) -> None:
    conn = connection(pair[0], Transport())
    fut = begin(conn, Progress())
    conn.data_received(OK)
    assert isinstance(await fut, Response)


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


@pytest.mark.parametrize(
    ("gateway_did", "gone"),
    [
        (lambda s: None, False),
        (lambda s: s.shutdown(socket.SHUT_WR), True),
        (lambda s: s.sendall(b"HTTP/1.1 200 OK\r\n"), True),
        (_reset, True),
    ],
    ids=["nothing", "fin", "stray-bytes", "reset"],
)
async def test_an_idle_connection_already_closed_is_seen(
    pair: tuple[socket.socket, socket.socket], gateway_did: Any, gone: bool
) -> None:
    conn = connection(pair[0], Transport())
    gateway_did(pair[1])
    assert conn.gone() is gone


@pytest.mark.parametrize(
    ("answer_begun", "resent"),
    [(b"", True), (b"HTTP/1.1 100 Continue\r\n\r\n", False), (b"HTTP/1.1 2", False)],
    ids=["no-byte", "interim-answer", "part-of-a-head"],
)
async def test_a_loss_before_any_answer_byte_is_handed_back(
    pair: tuple[socket.socket, socket.socket], answer_begun: bytes, resent: bool
) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]  # nothing listens: a fresh connection is refused
    conn = connection(pair[0], Transport(), port)
    conn.reused = True
    conn.resend = b"GET / HTTP/1.1\r\n\r\n"
    fut = begin(conn, Progress())
    if answer_begun:
        conn.data_received(answer_begun)
    conn.connection_lost(None)
    assert fut.done() is not resent  # a resend goes on, on a fresh connection
    result = await fut
    # Refused, the resend does not hide the first loss: it stands, ambiguous as it was.
    assert isinstance(result, ConnectionLost)
    assert conn.pool.open == 0
