"""The traffic listener byte by byte: keep-alive, pipelining, limits, hostile and broken
HTTP, timeouts, streaming framing and graceful close, over real loopback sockets."""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncIterator, Awaitable, Callable

import orjson
import pytest

from proxy import server as srv
from proxy.server import Answer, BodyError, ProxyServer, Request
from tests.support import eventually

HOST = "127.0.0.1"
CAP = 1024


class Echo:
    """A handler that answers with what it read, and remembers every request."""

    def __init__(self, cap: int = CAP) -> None:
        self.cap = cap
        self.seen: list[tuple[str, str, bytes | str]] = []
        self.finished: list[str] = []
        self.gate: asyncio.Event | None = None  # when set, handlers wait for it

    async def __call__(self, req: Request) -> Answer:
        try:
            body: bytes | str = await req.read(self.cap)
        except BodyError as exc:
            self.seen.append((req.method, req.raw_path, type(exc).__name__))
            status = 413 if isinstance(exc, srv.BodyOverCap) else 400
            return Answer(status, {"Content-Type": "text/plain"}, type(exc).__name__.encode())
        self.seen.append((req.method, req.raw_path, body))
        if self.gate is not None:
            await self.gate.wait()
        self.finished.append(req.raw_path)
        if req.raw_path == "/boom":
            raise RuntimeError("handler bug")
        if req.raw_path == "/empty":
            return Answer(204, {})
        headers = {"Content-Type": "text/plain", "X-Path": req.path, "X-Remote": req.remote or ""}
        return Answer(200, headers, b"echo:" + (body if isinstance(body, bytes) else b""))


@contextlib.asynccontextmanager
async def serving(
    handler: Callable[[Request], Awaitable[Answer]] | None = None, cap: int = CAP, **kw: float
) -> AsyncIterator[tuple[ProxyServer, Echo]]:
    echo = Echo(cap)
    server = ProxyServer(handler or echo, lambda: cap, **kw)
    await server.start(HOST, 0)
    try:
        yield server, echo
    finally:
        await server.close(1.0)


async def connect(server: ProxyServer) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection(HOST, server.port)


async def read_answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One HTTP/1.1 answer; the body by Content-Length, chunks, or until close."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode().split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.lower(): v for k, v in (ln.split(": ", 1) for ln in lines[1:] if ln)}
    if "content-length" in headers:
        body = await reader.readexactly(int(headers["content-length"]))
    elif headers.get("transfer-encoding") == "chunked":
        body = b""
        while True:
            size = int((await reader.readuntil(b"\r\n")).strip(), 16)
            chunk = await reader.readexactly(size + 2)
            if size == 0:
                break
            body += chunk[:-2]
    elif status in (204, 304) or status < 200:
        body = b""
    else:
        body = await asyncio.wait_for(reader.read(), 5)
    return status, headers, body


async def closed(reader: asyncio.StreamReader) -> bool:
    """True once the server has closed its side (EOF, or a reset)."""
    try:
        return await asyncio.wait_for(reader.read(1), 5) == b""
    except ConnectionResetError:
        return True


def post(path: str, body: bytes, extra: str = "") -> bytes:
    head = f"POST {path} HTTP/1.1\r\nHost: t\r\nContent-Length: {len(body)}\r\n{extra}\r\n"
    return head.encode() + body


async def test_keep_alive_serves_many_requests_on_one_connection() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        for i in range(3):
            writer.write(post(f"/v1/{i}", b"x" * i))
            status, headers, body = await read_answer(reader)
            assert (status, body) == (200, b"echo:" + b"x" * i)
            assert "connection" not in headers
            assert re.match(r"\w{3}, \d\d \w{3} \d{4}", headers["date"])
        assert headers["x-remote"] == HOST
        writer.close()


async def test_pipelined_requests_are_answered_in_order() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(b"".join(post(f"/p/{i}", str(i).encode()) for i in range(5)))
        bodies = [(await read_answer(reader))[2] for _ in range(5)]
        assert bodies == [f"echo:{i}".encode() for i in range(5)]
        writer.close()


async def test_chunked_request_body_is_read_whole() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n"
        )
        assert (await read_answer(reader))[2] == b"echo:abcde"
        writer.close()


async def test_body_arriving_in_pieces_is_waited_for() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        data = post("/slow", b"0123456789")
        for i in range(0, len(data), 7):
            writer.write(data[i : i + 7])
            await asyncio.sleep(0.02)
        assert (await read_answer(reader))[2] == b"echo:0123456789"
        writer.close()


@pytest.mark.parametrize(
    ("raw", "status", "detail"),
    [
        (b"GARBAGE\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET / HTTP/1.1\r\nHost t\r\n\r\n", 400, "malformed HTTP request"),
        (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414, "request target exceeds"),
        (b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 17000 + b"\r\n\r\n", 431, "header field"),
        (
            b"GET / HTTP/1.1\r\n" + b"".join(b"X-%d: 1\r\n" % i for i in range(200)) + b"\r\n",
            431,
            "header fields",
        ),
        (b"GET / HTTP/1.1\r\nExpect: magic\r\n\r\n", 417, "Expect"),
        (
            b"POST / HTTP/1.1\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n",
            400,
            "malformed HTTP request",
        ),
        (b"POST / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400, "malformed"),
        (b"GET / HTTP/1.1\r\n\r\n", 400, "exactly one Host"),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400, "exactly one Host"),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
            501,
            "chunked transfer coding",
        ),
        (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505, "HTTP/2.0"),
        (
            b"POST /pay HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: h2c\r\n"
            b"Content-Length: 2\r\n\r\n{}",
            400,
            "upgrade with a request body",
        ),
    ],
    ids=[
        "garbage",
        "header-without-colon",
        "target-too-long",
        "field-too-large",
        "too-many-fields",
        "unknown-expectation",
        "length-and-chunked",
        "negative-length",
        "no-host",
        "two-hosts",
        "other-transfer-coding",
        "http-2-line",
        "upgrade-with-body",
    ],
)
async def test_malformed_requests_get_a_problem_and_the_connection_closes(
    raw: bytes, status: int, detail: str
) -> None:
    async with serving() as (server, echo):
        reader, writer = await connect(server)
        writer.write(raw)
        got, headers, body = await read_answer(reader)
        assert got == status
        assert headers["content-type"] == "application/problem+json"
        assert headers["connection"] == "close"
        problem = orjson.loads(body)
        assert problem["status"] == status and detail in problem["detail"]
        assert await closed(reader)
        assert echo.seen == []
        assert server.refused == 1
        writer.close()


async def test_a_head_that_never_ends_is_refused_without_buffering_it() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nX-Endless: ")
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(b"v" * 1024)
                await writer.drain()
        status, _, body = await read_answer(reader)
        assert status == 431 and b"request head exceeds" in body
        writer.close()


async def test_the_request_before_a_malformed_one_is_still_answered() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(post("/first", b"ok") + b"NOT HTTP\r\n\r\n")
        first = await read_answer(reader)
        assert first[0] == 200 and first[2] == b"echo:ok"
        assert "connection" not in first[1]
        assert (await read_answer(reader))[0] == 400
        assert await closed(reader)
        writer.close()


async def test_body_over_the_cap_is_refused_and_not_buffered() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(
            b"POST /big HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            + (b"400\r\n" + b"x" * 1024 + b"\r\n") * 4
        )
        status, headers, body = await read_answer(reader)
        assert (status, body) == (413, b"BodyOverCap")
        assert headers["connection"] == "close"
        assert await closed(reader)
        writer.close()


async def test_broken_chunk_framing_mid_body_reaches_the_handler_as_an_error() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab")
        await asyncio.sleep(0.05)
        writer.write(b"c\r\nzz-not-hex\r\n")
        status, headers, body = await read_answer(reader)
        assert (status, body) == (400, b"MalformedBody")
        assert headers["connection"] == "close"
        writer.close()


async def test_expect_continue_is_answered_when_the_body_is_wanted() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(
            b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Length: 4\r\nExpect: 100-continue\r\n\r\n"
        )
        interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert interim == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"data")
        assert (await read_answer(reader))[2] == b"echo:data"
        writer.close()


async def test_http_1_0_and_connection_close_end_the_connection() -> None:
    async with serving() as (server, _echo):
        for request in (
            b"GET /old HTTP/1.0\r\n\r\n",
            b"GET /bye HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
        ):
            reader, writer = await connect(server)
            writer.write(request)
            status, headers, _ = await read_answer(reader)
            assert status == 200 and headers["connection"] == "close"
            assert await closed(reader)
            writer.close()


async def test_head_and_204_answers_carry_no_body() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(b"HEAD /h HTTP/1.1\r\nHost: t\r\n\r\nGET /empty HTTP/1.1\r\nHost: t\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"Content-Length" not in head
        empty = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert empty.startswith(b"HTTP/1.1 204 No Content\r\n")
        assert b"Content-Length" not in empty
        writer.write(post("/after", b"1"))
        assert (await read_answer(reader))[2] == b"echo:1"  # nothing stray in between
        writer.close()


async def test_a_handler_crash_is_a_500_and_the_server_keeps_serving() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(post("/boom", b""))
        status, headers, _body = await read_answer(reader)
        assert status == 500 and headers["content-type"] == "application/problem+json"
        writer.write(post("/next", b"2"))
        assert (await read_answer(reader))[2] == b"echo:2"
        writer.close()


async def test_a_client_leaving_mid_request_never_cancels_the_handler() -> None:
    async with serving() as (server, echo):
        echo.gate = asyncio.Event()
        _reader, writer = await connect(server)
        writer.write(post("/pay", b"{}"))
        await eventually(lambda: bool(echo.seen))
        writer.close()
        await asyncio.sleep(0.1)
        echo.gate.set()
        await eventually(lambda: echo.finished == ["/pay"])


async def test_a_client_leaving_mid_body_fails_the_read() -> None:
    async with serving() as (server, echo):
        _reader, writer = await connect(server)
        writer.write(b"POST /part HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        await asyncio.sleep(0.05)
        writer.close()
        await eventually(lambda: echo.seen == [("POST", "/part", "ClientClosed")])


async def test_a_stalled_head_gets_408_and_a_stalled_body_fails_the_read() -> None:
    async with serving(read_timeout=0.3) as (server, echo):
        reader, writer = await connect(server)
        writer.write(b"GET / HTTP/1.1\r\nHost: t\r\n")
        status, headers, body = await read_answer(reader)
        assert status == 408 and b"head did not arrive" in body
        assert headers["connection"] == "close"
        writer.close()
        reader, writer = await connect(server)
        writer.write(b"POST /b HTTP/1.1\r\nHost: t\r\nContent-Length: 10\r\n\r\nabc")
        status, _headers, body = await read_answer(reader)
        assert (status, body) == (400, b"BodyTimeout")
        assert echo.seen == [("POST", "/b", "BodyTimeout")]
        writer.close()


async def test_idle_keep_alive_connections_are_closed() -> None:
    async with serving(keepalive_timeout=0.3) as (server, _echo):
        reader, writer = await connect(server)
        writer.write(post("/1", b""))
        await read_answer(reader)
        assert await closed(reader)
        writer.close()


async def test_an_upgrade_request_is_answered_over_http_1_1_then_closed() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(
            b"GET /ws HTTP/1.1\r\nHost: t\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n"
            b"\x81\x05hello"
        )
        status, headers, _ = await read_answer(reader)
        assert status == 200 and headers["connection"] == "close"
        assert await closed(reader)
        writer.close()


class Chunks:
    def __init__(self, parts: list[bytes], fail: bool = False) -> None:
        self.parts = parts
        self.fail = fail
        self.released = False

    async def iter_any(self) -> AsyncIterator[bytes]:
        for part in self.parts:
            await asyncio.sleep(0)
            yield part
        if self.fail:
            raise ConnectionResetError("gateway died mid-body")

    def release(self) -> None:
        self.released = True


@pytest.mark.parametrize(
    ("request_line", "length", "framing"),
    [
        (b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n", 11, "content-length"),
        (b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n", None, "chunked"),
        (b"GET /s HTTP/1.0\r\n\r\n", None, "close"),
    ],
)
async def test_streamed_answers_are_framed_for_the_client(
    request_line: bytes, length: int | None, framing: str
) -> None:
    stream = Chunks([b"lo ", b"wor", b"ld"])

    async def handler(req: Request) -> Answer:
        return Answer(200, {}, b"hel", stream=stream, length=length)

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(request_line)
        status, headers, body = await read_answer(reader)
        assert (status, body) == (200, b"hello world")
        assert stream.released
        if framing == "content-length":
            assert headers["content-length"] == "11"
        elif framing == "chunked":
            assert headers["transfer-encoding"] == "chunked"
        else:
            assert headers["connection"] == "close"
        writer.close()


async def test_a_stream_that_breaks_cuts_the_client_off() -> None:
    stream = Chunks([b"part"], fail=True)

    async def handler(req: Request) -> Answer:
        return Answer(200, {}, b"", stream=stream, length=100)

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n")
        await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        with pytest.raises((asyncio.IncompleteReadError, ConnectionResetError)):
            await asyncio.wait_for(reader.readexactly(100), 5)
        assert stream.released
        writer.close()


async def test_close_drains_in_flight_requests_and_closes_idle_connections() -> None:
    async with serving() as (server, echo):
        idle_reader, idle_writer = await connect(server)
        idle_writer.write(post("/warm", b""))
        await read_answer(idle_reader)
        echo.gate = asyncio.Event()
        reader, writer = await connect(server)
        port = server.port
        writer.write(post("/slow", b"s"))
        await eventually(lambda: len(echo.seen) == 2)
        closing = asyncio.get_running_loop().create_task(server.close(5.0))
        assert await closed(idle_reader)
        with pytest.raises(OSError):
            await asyncio.open_connection(HOST, port)
        echo.gate.set()
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"echo:s", "close")
        await asyncio.wait_for(closing, 5)
        idle_writer.close()
        writer.close()


async def test_large_bodies_back_to_back_on_one_connection() -> None:
    big = b"x" * 900_000
    async with serving(cap=1024 * 1024) as (server, _echo):
        reader, writer = await connect(server)
        for _ in range(3):
            writer.write(post("/big", big))
            status, _, body = await read_answer(reader)
            assert (status, len(body)) == (200, len(big) + 5)
        writer.close()


async def test_a_half_closed_client_still_gets_its_answer() -> None:
    async with serving() as (server, echo):
        echo.gate = asyncio.Event()
        reader, writer = await connect(server)
        writer.write(post("/pay", b"{}"))
        writer.write_eof()
        await eventually(lambda: bool(echo.seen))
        echo.gate.set()
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"echo:{}", "close")
        assert await closed(reader)
        writer.close()


async def test_a_deep_pipeline_is_parsed_a_slice_at_a_time_and_served_whole() -> None:
    async with serving() as (server, echo):
        echo.gate = asyncio.Event()
        reader, writer = await connect(server)
        writer.write(b"".join(post(f"/{i}", b"") for i in range(1000)))
        await eventually(lambda: bool(echo.seen))
        await asyncio.sleep(0.1)
        (conn,) = server.conns
        assert srv.MAX_PIPELINED <= len(conn.waiting) < srv.MAX_WAITING
        assert conn.read_paused and conn.backlog
        echo.gate.set()
        paths = [(await read_answer(reader))[1]["x-path"] for _ in range(1000)]
        assert paths == [f"/{i}" for i in range(1000)]
        writer.close()


async def test_the_last_pipelined_request_gets_its_body_while_earlier_ones_wait() -> None:
    async with serving(read_timeout=5.0) as (server, echo):
        echo.gate = asyncio.Event()
        reader, writer = await connect(server)
        queued = b"".join(post(f"/{i}", b"q") for i in range(srv.MAX_PIPELINED - 1))
        writer.write(post("/slow", b"s") + queued + post("/last", b"abcdefghij")[:-7])
        await eventually(lambda: bool(echo.seen))
        echo.gate.set()
        await asyncio.sleep(0.1)
        writer.write(b"defghij")
        started = asyncio.get_running_loop().time()
        bodies = [(await read_answer(reader))[2] for _ in range(srv.MAX_PIPELINED + 1)]
        assert bodies[-1] == b"echo:abcdefghij"
        assert asyncio.get_running_loop().time() - started < 2.0
        writer.close()


async def test_a_client_not_reading_its_answers_stops_being_read() -> None:
    async def handler(req: Request) -> Answer:
        await req.read(CAP)
        return Answer(200, {}, b"a" * 4096)

    async with serving(handler) as (server, _):
        _reader, writer = await connect(server)
        request = b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(2.0):
                for _ in range(100_000):
                    writer.write(request * 10)
                    await writer.drain()  # blocks once the server stops reading
        (conn,) = server.conns
        assert conn.read_paused and conn.held
        assert conn.transport is not None
        assert conn.transport.get_write_buffer_size() < 1024 * 1024
        writer.close()


async def test_a_client_that_stops_reading_is_cut_off_after_the_write_timeout() -> None:
    stream = Chunks([b"x" * 65536] * 2000)

    async def handler(req: Request) -> Answer:
        return Answer(200, {}, b"", stream=stream, length=65536 * 2000)

    async with serving(handler, write_timeout=0.5) as (server, _):
        _reader, writer = await connect(server)
        writer.write(b"GET /s HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(lambda: stream.released and not server.conns and not server.tasks)
        writer.close()


async def test_after_an_abort_nothing_more_is_served_on_the_connection() -> None:
    stream = Chunks([b"part"], fail=True)
    served: list[str] = []

    async def handler(req: Request) -> Answer:
        served.append(req.raw_path)
        await req.read(CAP)
        if req.raw_path == "/stream":
            return Answer(200, {}, b"", stream=stream)
        return Answer(200, {}, b"paid")

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /stream HTTP/1.1\r\nHost: t\r\n\r\n" + post("/pay", b"{}"))
        with contextlib.suppress(ConnectionResetError):
            await asyncio.wait_for(reader.read(), 5)
        await asyncio.sleep(0.1)
        assert served == ["/stream"]
        writer.close()


async def test_a_cancelled_handler_resets_the_connection() -> None:
    served: list[str] = []

    async def handler(req: Request) -> Answer:
        served.append(req.raw_path)
        if req.raw_path == "/pay":
            raise asyncio.CancelledError
        return Answer(200, {}, b"next")

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(post("/pay", b"") + post("/next", b""))
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(reader.read(), 5) == b""
        assert served == ["/pay"]
        writer.close()


@pytest.mark.parametrize(("declared", "sent"), [(10, b"short"), (3, b"too long")])
async def test_a_streamed_body_that_breaks_its_length_resets_the_connection(
    declared: int, sent: bytes
) -> None:
    stream = Chunks([sent])

    async def handler(req: Request) -> Answer:
        return Answer(200, {}, b"", stream=stream, length=declared)

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /s HTTP/1.1\r\nHost: t\r\n\r\nGET /s HTTP/1.1\r\nHost: t\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            data = await asyncio.wait_for(reader.read(), 5)
            assert data.count(b"HTTP/1.1 200") == 1
            assert b"too long" not in data
        writer.close()


async def test_http_1_0_keep_alive_is_honoured_without_chunked_framing() -> None:
    stream = Chunks([b"abc"])

    async def handler(req: Request) -> Answer:
        if req.raw_path == "/s":
            return Answer(200, {}, b"", stream=stream)
        return Answer(200, {}, b"whole")

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /w HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"whole", "keep-alive")
        writer.write(b"GET /s HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        status, headers, body = await read_answer(reader)
        assert (status, body, headers["connection"]) == (200, b"abc", "close")
        assert "transfer-encoding" not in headers
        writer.close()


async def test_endless_trailers_are_refused() -> None:
    async with serving() as (server, _echo):
        reader, writer = await connect(server)
        writer.write(
            b"POST /c HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: "
        )
        with contextlib.suppress(ConnectionError):
            for _ in range(200):
                writer.write(b"v" * 4096)
                await writer.drain()
        status, _, body = await read_answer(reader)
        assert status in (400, 431), body
        writer.close()


async def test_trickling_bytes_does_not_hold_a_connection() -> None:
    async with serving(read_timeout=0.5, keepalive_timeout=0.5) as (server, _echo):
        head_reader, head = await connect(server)
        _, crlf = await connect(server)
        head.write(b"GET / HTTP/1.1\r\n")
        for _ in range(12):
            await asyncio.sleep(0.2)
            for writer, byte in ((head, b"X"), (crlf, b"\r\n")):
                if not writer.is_closing():
                    with contextlib.suppress(ConnectionError):
                        writer.write(byte)
        status, _, _ = await read_answer(head_reader)
        assert status == 408
        await eventually(lambda: len(server.conns) <= 1, within=5.0)
        head.close()
        crlf.close()


async def test_close_lets_written_answers_reach_the_client() -> None:
    big = b"x" * (8 * 1024 * 1024)
    answered: list[str] = []

    async def handler(req: Request) -> Answer:
        answered.append(req.raw_path)
        return Answer(200, {}, big)

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n")
        await eventually(lambda: bool(answered) and not server.tasks)
        closing = asyncio.get_running_loop().create_task(server.close(5.0))
        status, _headers, body = await read_answer(reader)
        assert (status, len(body)) == (200, len(big))
        await asyncio.wait_for(closing, 5)
        writer.close()


async def test_trailers_have_their_own_field_budget_and_empty_stream_pieces_are_skipped() -> None:
    stream = Chunks([b"ab", b"", b"cd"])

    async def handler(req: Request) -> Answer:
        body = await req.read(CAP)
        return Answer(200, {"X-Got": body.decode()}, b"", stream=stream)

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        fields = b"".join(b"X-%d: 1\r\n" % i for i in range(srv.MAX_HEADERS - 2))
        writer.write(
            b"POST /t HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n" + fields + b"\r\n"
            b"3\r\nabc\r\n0\r\nX-Trailer: 1\r\n\r\n"
        )
        status, headers, body = await read_answer(reader)
        assert (status, headers["x-got"], body) == (200, "abc", b"abcd")
        writer.close()


async def test_close_never_starts_a_request_held_behind_an_unread_answer() -> None:
    served: list[str] = []

    async def handler(req: Request) -> Answer:
        served.append(req.raw_path)
        await req.read(CAP)
        return Answer(200, {}, b"x" * (16 * 1024 * 1024) if req.raw_path == "/big" else b"ok")

    async with serving(handler) as (server, _):
        reader, writer = await connect(server)
        writer.write(b"GET /big HTTP/1.1\r\nHost: t\r\n\r\n" + post("/pay", b"{}"))
        await eventually(lambda: any(c.held for c in server.conns))
        closing = asyncio.get_running_loop().create_task(server.close(5.0))
        status, _, body = await read_answer(reader)
        assert (status, len(body)) == (200, 16 * 1024 * 1024)
        assert await closed(reader)
        await asyncio.wait_for(closing, 5)
        assert served == ["/big"]
        writer.close()
