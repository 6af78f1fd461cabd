"""Draining and closing with keep-alive clients: answers say Connection: close, idle
connections close between requests, and a request that has begun arriving is served."""

from __future__ import annotations

import asyncio

from tests.integration.listener.test_server import closed, connect, post, read_answer, serving
from tests.support import eventually


async def test_while_draining_answers_say_close_and_the_connection_ends() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(post("/before", b"1"))
        _, headers, _ = await read_answer(reader)
        assert "connection" not in headers
        server.drain()
        writer.write(post("/during", b"2"))
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"echo:2", "close")
        assert await closed(reader)
        writer.close()


async def test_draining_closes_idle_connections_between_requests_only() -> None:
    async with serving() as (server, echo):
        idle_reader, idle_writer = await connect(server)
        idle_writer.write(post("/warm", b""))
        await read_answer(idle_reader)
        echo.gate = asyncio.Event()
        busy_reader, busy_writer = await connect(server)
        busy_writer.write(post("/slow", b"s"))
        await eventually(lambda: len(echo.seen) == 2)
        server.drain()
        # Not at once: a keep-alive client's next request may already be on its way.
        await asyncio.sleep(0.3)
        assert not idle_reader.at_eof()
        assert await closed(idle_reader)  # idle past DRAIN_IDLE: closed by the sweep
        echo.gate.set()
        status, headers, body = await read_answer(busy_reader)
        assert (status, body, headers["connection"]) == (200, b"echo:s", "close")
        idle_writer.close()
        busy_writer.close()


async def test_close_serves_a_request_whose_head_has_begun_arriving() -> None:
    async with serving() as (server, echo):
        reader, writer = await connect(server)
        writer.write(post("/first", b"1"))
        await read_answer(reader)
        writer.write(b"POST /pay HTTP/1.1\r\nHost: t\r\n")
        await eventually(lambda: any(c.head.in_head for c in server.conns))
        closing = asyncio.get_running_loop().create_task(server.close(5.0))
        await asyncio.sleep(0.2)
        writer.write(b"Content-Length: 2\r\n\r\n{}")
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"echo:{}", "close")
        assert await closed(reader)
        writer.close()  # as clients do on Connection: close; the lingering close ends
        await asyncio.wait_for(closing, 5)
        assert [path for _, path, _ in echo.seen] == ["/first", "/pay"]


async def test_close_gives_a_new_connection_time_for_its_first_request() -> None:
    async with serving() as (server, echo):
        reader, writer = await connect(server)
        await eventually(lambda: bool(server.conns))
        closing = asyncio.get_running_loop().create_task(server.close(5.0))
        await asyncio.sleep(0.2)
        writer.write(post("/late", b"x"))
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"echo:x", "close")
        writer.close()
        await asyncio.wait_for(closing, 5)
        assert [path for _, path, _ in echo.seen] == ["/late"]


async def test_close_still_closes_a_connection_that_never_sends() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        await eventually(lambda: bool(server.conns))
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(server.close(5.0), 5)
        assert await closed(reader)
        assert asyncio.get_running_loop().time() - started < 3.0
        writer.close()
