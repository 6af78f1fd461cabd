"""The upstream HTTP/1.1 client and the forwarder on it, against real loopback servers
(tests/integration/upstream_support.py): ordinary traffic, the bytes on the wire, and every
way an exchange can end.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import socket
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
from multidict import CIMultiDict

from proxy.aio import spawn
from proxy.forward import BUFFER_LIMIT, AttemptFailed, response_headers
from proxy.upstream.client import MAX_HEAD_BYTES, Origin, UpstreamClient
from proxy.upstream.connection import Connection
from proxy.upstream.response import Response, UpstreamError
from proxy.upstream.state import Outcome
from tests.integration.upstream_support import (
    BIG,
    HEAD_ANSWER,
    HOST,
    OK,
    Raw,
    aiohttp_gateway,
    answering,
    attempt,
    failure,
    raw_server,
    reset,
)
from tests.support import black_hole, eventually, running_proxy
from tests.unit.upstream.health_support import gateway


def _same(value: Response | UpstreamError) -> Response | UpstreamError:
    return value


async def send(
    client: UpstreamClient,
    origin: Origin,
    method: str,
    target: str,
    headers: CIMultiDict[str],
    body: bytes,
) -> Response:
    """The client's entry point on its own, answering the Response as soon as it is known."""
    pool = client.pool(origin)
    data = client.encode(pool, method, target, headers, body)
    result = await client.send(
        pool, data, within=5, connect_timeout=1, convert=_same, head_only=method == "HEAD"
    )
    assert isinstance(result, Response), result
    return result


# -- ordinary traffic -----------------------------------------------------------------------


async def test_keep_alive_reuses_one_connection() -> None:
    client = UpstreamClient()
    async with aiohttp_gateway() as port:
        seen = [orjson.loads((await attempt(client, port)).body or b"") for _ in range(3)]
        assert len({s["port"] for s in seen}) == 1  # one client port: one connection
        assert seen[0] == {"port": seen[0]["port"], "size": 15, "host": f"127.0.0.1:{port}"}
        assert client.idle_count(("http", HOST, port)) == 1
    await client.close()


async def test_chunked_response_is_read_whole_and_the_connection_reused() -> None:
    client = UpstreamClient()
    async with aiohttp_gateway() as port:
        reply = await attempt(client, port, "/chunked", method="GET", body=b"")
        assert (reply.body, reply.stream) == (b"y" * 30, None)
        assert client.idle_count(("http", HOST, port)) == 1
    await client.close()


@pytest.mark.parametrize(
    ("path", "buffered"),
    [("/big", 0), (f"/chunked?size={3 * BUFFER_LIMIT}", BUFFER_LIMIT + 1)],
    ids=["content-length", "unsized-chunked"],
)
async def test_large_response_is_streamed(path: str, buffered: int) -> None:
    client = UpstreamClient()
    async with aiohttp_gateway() as port:
        reply = await attempt(client, port, path, method="GET", body=b"")
        assert reply.stream is not None
        assert len(reply.body or b"") >= buffered
        received = len(reply.body or b"")
        async for chunk in reply.stream.content.iter_any():
            received += len(chunk)
        assert received == (BIG if path == "/big" else 3 * BUFFER_LIMIT)
        reply.release()
        assert client.idle_count(("http", HOST, port)) == 1
    await client.close()


@pytest.mark.parametrize(
    ("path", "size"),
    [("/big", BIG), (f"/chunked?size={3 * BUFFER_LIMIT}", 3 * BUFFER_LIMIT)],
    ids=["content-length", "unsized-chunked"],
)
async def test_large_answer_streams_through_payswitch(tmp_path: Path, path: str, size: int) -> None:
    async with aiohttp_gateway() as port:
        rules = f"""
            gateways:
              g1: {{url: "http://{HOST}:{port}", region: eu}}
            routes:
              - name: downloads
                match: {{path_prefix: /, methods: [GET]}}
                region: {{default: eu}}
                gateways: [g1]
        """
        async with running_proxy(rules, tmp_path) as proxy:
            for _ in range(2):  # the second on the connection the first handed back
                status, headers, body = await proxy.request("GET", path, data=None)
                assert (status, len(body), headers["X-Payswitch-Gateway"]) == (200, size, "g1")


# -- scripted edge cases --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "body", "length"),
    [
        ("GET", b"", None),
        ("HEAD", b"", None),
        ("DELETE", b"", None),
        ("POST", b"", b"0"),
        ("PUT", b"", b"0"),
        ("PATCH", b"", b"0"),
        ("POST", b'{"a": 1}', b"8"),
    ],
    ids=["get", "head", "delete", "empty-post", "empty-put", "empty-patch", "post"],
)
async def test_request_head(method: str, body: bytes, length: bytes | None) -> None:
    headers = CIMultiDict(
        [("X-A", "1"), ("Host", "client.example"), ("X-A", "2"), ("Transfer-Encoding", "chunked")]
    )
    headers.add("content-length", "999")
    client = UpstreamClient()
    async with raw_server(answering(b"HTTP/1.1 204 No Content\r\n\r\n")) as raw:
        resp = await send(client, raw.origin, method, "/base/v1/x?q=1", headers, body)
        resp.release()
        expected = [
            f"{method} /base/v1/x?q=1 HTTP/1.1".encode(),
            f"Host: {HOST}:{raw.port}".encode(),
        ]
        expected += [b"X-A: 1", b"X-A: 2"] + ([b"Content-Length: " + length] if length else [])
        assert raw.requests == [b"\r\n".join([*expected, b"", body])]
    await client.close()


class RecordingTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append(bytes(data))

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def abort(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing


async def test_a_request_is_one_write_and_cannot_be_split() -> None:
    client = UpstreamClient()
    origin = ("http", "gw.example", 80)
    pool = client.pool(origin)
    ours, theirs = socket.socketpair()  # a live socket with nothing to read: not stale
    ours.setblocking(False)
    conn = Connection(pool, ours)
    pool.open += 1
    transport = RecordingTransport()
    conn.connection_made(transport)
    conn.done = conn.keep_alive = True
    conn.finish()  # idle in the pool, as after an earlier exchange; no DNS, no connect
    asyncio.get_running_loop().call_soon(conn.data_received, OK)
    resp = await send(client, origin, "POST", "/pay", CIMultiDict({"X-Id": "7"}), b"{}")
    assert transport.writes == [
        b"POST /pay HTTP/1.1\r\nHost: gw.example\r\nX-Id: 7\r\nContent-Length: 2\r\n\r\n{}"
    ]
    assert resp.body == b"ok"  # read whole, and the connection handed back
    with pytest.raises(ValueError, match="CR or LF"):
        await send(client, origin, "GET", "/", CIMultiDict({"X-Id": "7\r\nX-Evil: 1"}), b"")
    assert len(transport.writes) == 1
    assert client.idle_count(origin) == 1
    ours.close()
    theirs.close()


@pytest.mark.parametrize(
    ("answer", "reused"),
    [
        (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\nok", False),
        (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok", False),
        (OK, True),
    ],
    ids=["connection-close", "http-1.0", "http-1.0-keep-alive", "http-1.1"],
)
async def test_connection_is_reused_only_after_a_keep_alive_answer(
    answer: bytes, reused: bool
) -> None:
    client = UpstreamClient()
    async with raw_server(answering(answer, answer)) as raw:
        for _ in range(2):
            reply = await attempt(client, raw.port)
            assert (reply.status, reply.body) == (200, b"ok")
        assert raw.connections == (1 if reused else 2)
    await client.close()


async def test_http10_body_ends_when_the_gateway_closes() -> None:
    client = UpstreamClient()
    async with raw_server(answering(b"HTTP/1.0 200 OK\r\n\r\nuntil close", then="close")) as raw:
        reply = await attempt(client, raw.port)
        assert reply.body == b"until close"
    await client.close()


@pytest.mark.parametrize(
    ("method", "answer"),
    [
        ("HEAD", HEAD_ANSWER),
        ("POST", b"HTTP/1.1 204 No Content\r\n\r\n"),
        ("GET", b"HTTP/1.1 304 Not Modified\r\nETag: x\r\n\r\n"),
    ],
    ids=["head", "204", "304"],
)
async def test_bodiless_answers_keep_the_connection_usable(method: str, answer: bytes) -> None:
    client = UpstreamClient()
    async with raw_server(answering(answer, OK)) as raw:
        first = await attempt(client, raw.port, method=method, body=b"")
        assert first.body == b""
        assert client.idle_count(raw.origin) == 1
        second = await attempt(client, raw.port)
        assert second.body == b"ok"
        assert raw.connections == 1
    await client.close()


async def test_interim_1xx_answers_are_skipped() -> None:
    answer = b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n" + OK
    client = UpstreamClient()
    async with raw_server(answering(answer)) as raw:
        reply = await attempt(client, raw.port)
        assert (reply.status, reply.body, "Link" in reply.headers) == (200, b"ok", False)
    await client.close()


async def test_duplicate_response_headers_keep_their_order() -> None:
    answer = (
        b"HTTP/1.1 201 Created\r\nSet-Cookie: a=1\r\nX-Trace: t\r\nSet-Cookie: b=2\r\n"
        b"Connection: X-Internal\r\nX-Internal: secret\r\nKeep-Alive: timeout=5\r\n"
        b"Content-Length: 2\r\n\r\nok"
    )
    client = UpstreamClient()
    async with raw_server(answering(answer)) as raw:
        reply = await attempt(client, raw.port)
        assert reply.headers.getall("Set-Cookie") == ["a=1", "b=2"]
        assert list(response_headers(reply.headers).items()) == [
            ("Set-Cookie", "a=1"),
            ("X-Trace", "t"),
            ("Set-Cookie", "b=2"),
        ]
    await client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HELLO WORLD\r\n\r\n",
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n",
        b"HTTP/1.1 200 " + b"r" * 9000 + b"\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n" + b"X-Many: 1\r\n" * 200 + b"\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"v" * MAX_HEAD_BYTES + b"\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Endless: " + b"v" * (3 * MAX_HEAD_BYTES),
        b"HTTP/1.1 200 OK\r\nContent-Length: nope\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ],
    ids=[
        "garbage-status-line",
        "upgrade",
        "status-line-too-long",
        "too-many-headers",
        "head-too-large",
        "head-never-ends",
        "bad-content-length",
        "bad-chunk",
    ],
)
async def test_invalid_answers_are_bad_responses(answer: bytes) -> None:
    client = UpstreamClient()
    async with raw_server(answering(answer)) as raw:
        failed = await failure(client, raw.port)
        assert (failed.outcome, failed.sent) == (Outcome.BAD_RESPONSE, True)
        await eventually(lambda: raw.ended == 1)  # never pooled
    await client.close()


@pytest.mark.parametrize("answered_before", [0, 1], ids=["fresh", "reused"])
async def test_reset_after_the_request_was_read_is_ambiguous(answered_before: int) -> None:
    client = UpstreamClient()
    async with raw_server(answering(*[OK] * answered_before, then="reset")) as raw:
        for _ in range(answered_before):
            await attempt(client, raw.port)
        failed = await failure(client, raw.port)
        # Even on a reused connection with no response byte: the gateway may have acted.
        assert (failed.outcome, failed.sent) == (Outcome.RESET, True)
        assert raw.connections == 1
    await client.close()


async def test_gateway_dying_mid_body_is_a_reset() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npartial"
    client = UpstreamClient()
    async with raw_server(answering(answer, then="close")) as raw:
        failed = await failure(client, raw.port)
        assert (failed.outcome, failed.sent) == (Outcome.RESET, True)
        assert "cut off" in failed.detail
    await client.close()


@pytest.mark.parametrize("how", ["close", "reset"])
async def test_idle_connection_closed_by_the_gateway_leaves_the_pool(how: str) -> None:
    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering(OK)(raw, reader, writer)
        if raw.connections == 1:
            await asyncio.sleep(0.05)  # idle in the client's pool, then gone
            if how == "reset":
                reset(writer)
            writer.close()

    client = UpstreamClient()
    async with raw_server(serve) as raw:
        await attempt(client, raw.port)
        assert client.idle_count(raw.origin) == 1
        await eventually(lambda: client.idle_count(raw.origin) == 0)
        reply = await attempt(client, raw.port)
        assert reply.body == b"ok"
        assert raw.connections == 2
    await client.close()


async def test_bytes_on_an_idle_connection_drop_it() -> None:
    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await answering(OK)(raw, reader, writer)
        await asyncio.sleep(0.05)
        writer.write(b"HTTP/1.1 200 OK\r\n")  # answering nothing that was asked

    client = UpstreamClient()
    async with raw_server(serve) as raw:
        await attempt(client, raw.port)
        assert client.idle_count(raw.origin) == 1
        await eventually(lambda: raw.ended == 1)
        assert client.idle_count(raw.origin) == 0
    await client.close()


async def test_refused_connection_provably_sent_nothing() -> None:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port = sock.getsockname()[1]
    client = UpstreamClient()
    failed = await failure(client, port)
    assert (failed.outcome, failed.sent) == (Outcome.CONNECT_FAILURE, False)


async def test_connect_timeout_provably_sent_nothing() -> None:
    client = UpstreamClient()
    try:
        with black_hole() as port:  # connect hangs on loopback
            try:
                async with asyncio.timeout(2.0):
                    failed = await failure(client, port, connect_timeout=0.2)
            except TimeoutError:
                pytest.skip("this kernel accepted a connection despite a full backlog")
            assert (failed.outcome, failed.sent) == (Outcome.CONNECT_FAILURE, False)
            assert "timed out" in failed.detail
            # The abandoned connect left nothing watching its descriptor: the next socket,
            # which may get the same number, connects and is answered.
            async with raw_server(answering(OK)) as raw:
                assert (await attempt(client, raw.port)).body == b"ok"
    finally:
        await client.close()


async def test_a_gateway_named_by_host_name_is_resolved_and_reached() -> None:
    client = UpstreamClient()
    async with raw_server(answering(OK)) as raw:
        named = dataclasses.replace(
            gateway(port=raw.port), host="localhost", url=f"http://localhost:{raw.port}"
        )
        try:
            reply = await attempt(client, raw.port, gw=named)
        except AttemptFailed as exc:  # localhost may resolve to ::1 first; 127.0.0.1 is next
            pytest.fail(f"localhost was not reached: {exc.detail}")
        assert reply.body == b"ok"
        assert raw.requests[0].startswith(b"POST /echo HTTP/1.1\r\nHost: localhost:")
    await client.close()


class _CountingResolver(uvloop.Loop):
    """uvloop, counting what goes to its resolver (libuv's thread pool)."""

    resolved: list[object]

    async def getaddrinfo(self, host: Any, *args: Any, **kwargs: Any) -> Any:
        self.resolved.append(host)
        return await super().getaddrinfo(host, *args, **kwargs)


def test_a_new_connection_to_an_ip_address_asks_no_resolver() -> None:
    # uvloop's own sock_connect resolves even a literal address again, on a pool thread.
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        assert isinstance(loop, _CountingResolver)
        client = UpstreamClient(max_idle=0)  # no reuse: each attempt makes a connection
        async with raw_server(answering(OK, OK, OK)) as raw:
            loop.resolved = []
            for _ in range(3):
                assert (await attempt(client, raw.port)).body == b"ok"
            assert raw.connections == 3
            assert loop.resolved == []
        await client.close()

    with asyncio.Runner(loop_factory=_CountingResolver) as runner:
        runner.run(scenario())


@pytest.mark.parametrize(
    "answer",
    [b"", b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\npart"],
    ids=["before-the-head", "mid-body"],
)
async def test_cancellation_closes_the_connection(answer: bytes) -> None:
    client = UpstreamClient()
    async with raw_server(answering(answer, OK)) as raw:
        task = spawn(attempt(client, raw.port), name="test-cancelled-attempt")
        await eventually(lambda: len(raw.requests) == 1)
        await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await eventually(lambda: raw.ended == 1)
        assert client.idle_count(raw.origin) == 0
        reply = await attempt(client, raw.port)
        assert reply.body == b"ok"
        assert raw.connections == 2
    await client.close()


async def test_idle_timeout_and_cap() -> None:
    client = UpstreamClient(idle_timeout=0.1, max_idle=1)
    async with raw_server(answering(OK, OK)) as raw:
        await asyncio.gather(attempt(client, raw.port), attempt(client, raw.port))
        assert (raw.connections, client.idle_count(raw.origin)) == (2, 1)
        await eventually(lambda: raw.ended == 2)
        assert client.idle_count(raw.origin) == 0
    await client.close()


async def test_close_closes_pooled_connections() -> None:
    client = UpstreamClient()
    async with raw_server(answering(OK)) as raw:
        await attempt(client, raw.port)
        await client.close()
        await eventually(lambda: raw.ended == 1)
        failed = await failure(client, raw.port)
        assert (failed.outcome, failed.sent) == (Outcome.CONNECT_FAILURE, False)


# -- the same on uvloop, the loop payswitch serves on ---------------------------------------

ON_UVLOOP: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
    "keep-alive": test_keep_alive_reuses_one_connection,
    "chunked": test_chunked_response_is_read_whole_and_the_connection_reused,
    "http-1.0-until-close": test_http10_body_ends_when_the_gateway_closes,
    "mid-body-death": test_gateway_dying_mid_body_is_a_reset,
    "bytes-while-idle": test_bytes_on_an_idle_connection_drop_it,
    "refused": test_refused_connection_provably_sent_nothing,
    "connect-timeout": test_connect_timeout_provably_sent_nothing,
    "host-name": test_a_gateway_named_by_host_name_is_resolved_and_reached,
    "close": test_close_closes_pooled_connections,
    "streamed": functools.partial(test_large_response_is_streamed, "/big", 0),
    "reset-on-reuse": functools.partial(test_reset_after_the_request_was_read_is_ambiguous, 1),
    "idle-reset": functools.partial(
        test_idle_connection_closed_by_the_gateway_leaves_the_pool, "reset"
    ),
    "cancelled": functools.partial(test_cancellation_closes_the_connection, b""),
    "head": functools.partial(
        test_bodiless_answers_keep_the_connection_usable, "HEAD", HEAD_ANSWER
    ),
}


@pytest.mark.parametrize("scenario", ON_UVLOOP.values(), ids=ON_UVLOOP.keys())
def test_on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(scenario())
