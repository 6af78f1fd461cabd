"""A gateway's answer as the handler reads it: framing known at once, the body whole or
streamed, and the connection handed back only after a complete answer."""

from __future__ import annotations

import asyncio
import gc
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest

from proxy.aio import spawn
from proxy.upstream.connection import Connection
from proxy.upstream.phase import Progress
from proxy.upstream.response import Response, UpstreamError
from tests.unit.upstream.test_connection import Transport, connection


@pytest.fixture
async def conn() -> AsyncIterator[Connection]:
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    yield connection(ours, Transport())
    ours.close()
    theirs.close()


def _same(value: Response | UpstreamError) -> Response | UpstreamError:
    return value


def begin(conn: Connection, method: str = "GET", limit: int = 4) -> asyncio.Future[Any]:
    fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    conn.exchange(
        fut,
        f"{method} / HTTP/1.1\r\n\r\n".encode(),
        head_only=method == "HEAD",
        limit=limit,
        within=5,
        convert=_same,
        progress=Progress(),
    )
    return fut


@pytest.mark.parametrize(
    ("method", "head", "length"),
    [
        ("GET", b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok", 2),
        ("GET", b"HTTP/1.1 204 No Content\r\n\r\n", 0),
        ("GET", b"HTTP/1.1 304 Not Modified\r\n\r\n", 0),
        ("HEAD", b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n", 0),
    ],
    ids=["sized", "204", "304", "head"],
)
async def test_a_whole_answer_hands_the_connection_back(
    conn: Connection, method: str, head: bytes, length: int
) -> None:
    fut = begin(conn, method)
    conn.data_received(head)
    resp = await fut
    assert isinstance(resp, Response)
    assert (resp.content_length, resp.streaming) == (length, False)
    assert list(conn.pool.idle) == [conn]


async def test_a_long_answer_streams_and_a_cut_one_closes(conn: Connection) -> None:
    fut = begin(conn, limit=4)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    resp = await fut
    assert isinstance(resp, Response)
    assert (resp.streaming, resp.body, resp.content_length) == (True, b"hello", None)
    conn.data_received(b"6\r\n world\r\n")
    chunks = resp.content.iter_any()
    assert await anext(chunks) == b" world"
    resp.release()  # before the last chunk: the connection cannot be reused
    assert not conn.pool.idle
    assert conn.transport is not None and conn.transport.is_closing()


async def test_read_up_to_stops_past_the_limit(conn: Connection) -> None:
    fut = begin(conn, limit=100)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n")
    resp = await fut  # larger than the caller buffers: streamed from the head on
    assert isinstance(resp, Response)
    conn.data_received(b"x" * 150)
    assert len(await resp.read_up_to(100)) == 150
    conn.data_received(b"y" * 150)
    assert await resp.read_up_to(1000) == b"y" * 150
    resp.release()
    assert list(conn.pool.idle) == [conn]


async def test_iter_any_gives_each_arrival_then_ends(conn: Connection) -> None:
    fut = begin(conn, limit=4)
    conn.data_received(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
    resp = await fut
    assert isinstance(resp, Response) and resp.streaming
    chunks = resp.content.iter_any()
    conn.data_received(b"6\r\n world\r\n")
    got = [await anext(chunks)]

    async def next_chunk() -> bytes:
        return await anext(chunks)

    waiting = spawn(next_chunk(), name="next-chunk")
    await asyncio.sleep(0)
    assert not waiting.done()  # nothing new arrived: it waits
    conn.data_received(b"1\r\n!\r\n0\r\n\r\n")
    got.append(await waiting)
    got += [chunk async for chunk in chunks]
    assert got == [b" world", b"!"]
    with pytest.raises(StopAsyncIteration):
        await anext(chunks)
    resp.release()  # the whole body was read: the connection goes back
    assert list(conn.pool.idle) == [conn]


async def test_an_answer_dropped_unreleased_closes_its_connection(conn: Connection) -> None:
    fut = begin(conn, limit=4)
    conn.data_received(b"HTTP/1.1 200 OK\r\nContent-Length: 300\r\n\r\n")
    assert isinstance(await fut, Response)
    # An abandoned attempt's answer, which nobody will release: collected, it closes its
    # connection (a second Response of the same exchange, so no future holds it).
    abandoned = Response(conn)
    del abandoned
    gc.collect()
    assert not conn.pool.idle
    assert conn.transport is not None and conn.transport.is_closing()
