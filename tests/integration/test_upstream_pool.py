"""The upstream client's pool on real loopback sockets: how far an exchange got (Progress),
the per-gateway connection cap, pooled connections the gateway already closed, the one-time
resend of an idempotent request, and payswitch running out of descriptors — alone and
through a running payswitch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import resource
import select
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import uvloop
from aiohttp import web
from multidict import CIMultiDict

from proxy.config.model import Limits
from proxy.forward import AttemptFailed, Forwarder, Reply
from proxy.upstream.client import UpstreamClient
from proxy.upstream.phase import Phase, Progress
from proxy.upstream.state import Outcome
from tests.integration.upstream_support import (
    HOST,
    OK,
    Raw,
    answering,
    attempt,
    failure,
    raw_server,
    read_request,
    reset,
)
from tests.support import eventually, running_proxy
from tests.unit.upstream.health_support import gateway


def phase_of(progress: Progress) -> Phase:
    return progress.phase  # read afresh: the exchange moves it between two looks


# -- progress -------------------------------------------------------------------------------


async def test_progress_follows_the_exchange() -> None:
    gate = asyncio.Event()

    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await read_request(reader)
        assert request is not None
        raw.requests.append(request)
        await gate.wait()
        writer.write(OK)
        await writer.drain()

    client = UpstreamClient()
    async with raw_server(serve) as raw:
        progress = Progress()
        fut = Forwarder(client).start(
            gateway(port=raw.port),
            "POST",
            "/",
            CIMultiDict(),
            b"{}",
            connect_timeout=1,
            within=5,
            progress=progress,
        )
        assert phase_of(progress) is Phase.CONNECTING
        await eventually(lambda: len(raw.requests) == 1)
        assert phase_of(progress) is Phase.SENT
        gate.set()
        reply = await fut
        assert isinstance(reply, Reply)
        assert (reply.status, progress.phase) == (200, Phase.ANSWERED)
    await client.close()


async def test_a_request_the_gateway_does_not_read_stays_writing() -> None:
    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        raw.requests.append(await reader.read(100))  # then reads no more
        await writer.wait_closed()  # until the client hangs up

    client = UpstreamClient()
    async with raw_server(serve) as raw:
        progress = Progress()
        fut = Forwarder(client).start(
            gateway(port=raw.port),
            "POST",
            "/",
            CIMultiDict(),
            b"x" * (64 * 1024 * 1024),  # more than the socket buffers on both sides hold
            connect_timeout=1,
            within=5,
            progress=progress,
        )
        await eventually(lambda: len(raw.requests) == 1)
        await asyncio.sleep(0.05)
        assert progress.phase is Phase.WRITING
        fut.cancel()
        await eventually(lambda: client.open_count(raw.origin) == 0)
    await client.close()


# -- the connection cap ---------------------------------------------------------------------


async def test_the_connection_cap_is_a_local_refusal_that_sent_nothing() -> None:
    gate = asyncio.Event()

    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while (request := await read_request(reader)) is not None:
            raw.requests.append(request)
            await gate.wait()
            writer.write(OK)

    client = UpstreamClient()
    async with raw_server(serve) as raw:
        gw = gateway(port=raw.port, limits=Limits(max_connections=1))
        first = spawn_attempt(client, gw)
        await eventually(lambda: len(raw.requests) == 1)
        progress = Progress()
        refused = await failure(client, raw.port, gw=gw, progress=progress)
        assert (refused.outcome, refused.sent, progress.phase) == (
            Outcome.LOCAL,
            False,
            Phase.CONNECTING,
        )
        assert "1 connections already open" in refused.detail
        gate.set()
        assert (await first).status == 200
        assert (await attempt(client, raw.port, gw=gw)).status == 200  # the slot is free again
        assert (raw.connections, client.open_count(raw.origin)) == (1, 1)
    await client.close()


def spawn_attempt(client: UpstreamClient, gw: Any) -> asyncio.Task[Reply]:
    return asyncio.get_running_loop().create_task(attempt(client, gw.port, gw=gw))


# -- a pooled connection the gateway already closed -----------------------------------------


async def _recv_request(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data or not data.endswith(b"}"):
        chunk = await loop.sock_recv(sock, 65536)
        if not chunk:
            break
        data += chunk
    return data


@pytest.mark.parametrize("restarted", [False, True], ids=["closed-idle", "restarted"])
async def test_a_close_already_received_is_never_written_to(restarted: bool) -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen()
    listener.setblocking(False)
    port = listener.getsockname()[1]
    client = UpstreamClient()
    first = spawn_attempt(client, gateway(port=port))
    served, _ = await loop.sock_accept(listener)
    await _recv_request(loop, served)
    await loop.sock_sendall(served, OK)
    assert (await first).status == 200
    origin = ("http", HOST, port)
    ((pooled, _),) = client.pool(origin).idle.items()
    served.close()  # the gateway's FIN...
    if restarted:
        listener.close()
    select.select([pooled.sock], [], [], 2)  # ...is in our socket, but the loop has not run
    assert client.idle_count(origin) == 1
    progress = Progress()
    second = Forwarder(client).start(
        gateway(port=port),
        "POST",
        "/",
        CIMultiDict(),
        b"{}",
        connect_timeout=1,
        within=5,
        progress=progress,
    )
    assert client.idle_count(origin) == 0  # looked at, found closed, never written to
    if restarted:
        result = await second
        assert isinstance(result, AttemptFailed)
        assert (result.outcome, result.sent) == (Outcome.CONNECT_FAILURE, False)
        assert progress.phase is Phase.CONNECTING
    else:
        fresh, _ = await loop.sock_accept(listener)
        assert (await _recv_request(loop, fresh)).startswith(b"POST / HTTP/1.1")
        await loop.sock_sendall(fresh, OK)
        result = await second
        assert isinstance(result, Reply)
        fresh.close()
        listener.close()
    await client.close()


def closing_after_read(fresh_too: bool, how: str) -> Callable[..., Coroutine[Any, Any, None]]:
    """A gateway that answers the first request of each connection, then reads the next
    and closes without a byte of answer (the idle-close race, every time); with
    `fresh_too` only the first connection answers at all."""

    async def serve(raw: Raw, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if raw.connections == 1 or not fresh_too:
            await answering(OK)(raw, reader, writer)
        request = await read_request(reader)
        if request is None:
            return
        raw.requests.append(request)
        if how == "reset":
            reset(writer)
        else:
            writer.close()

    return serve


@pytest.mark.parametrize(
    ("method", "how", "fresh_too", "expected"),
    [
        ("GET", "close", False, (200, 2)),
        ("PUT", "reset", False, (200, 2)),
        ("DELETE", "close", False, (200, 2)),
        ("POST", "close", False, (Outcome.RESET, 1)),
        ("PATCH", "reset", False, (Outcome.RESET, 1)),
        ("GET", "close", True, (Outcome.RESET, 2)),
    ],
    ids=["get", "put-reset", "delete", "post-ambiguous", "patch-ambiguous", "get-once-only"],
)
async def test_a_reused_connection_lost_before_any_answer(
    method: str, how: str, fresh_too: bool, expected: tuple[Any, int]
) -> None:
    client = UpstreamClient()
    async with raw_server(closing_after_read(fresh_too, how)) as raw:
        await attempt(client, raw.port)
        body = b"{}" if method in ("PUT", "POST", "PATCH") else b""
        try:
            got: Any = (await attempt(client, raw.port, method=method, body=body)).status
        except AttemptFailed as failed:
            assert failed.sent  # read, then closed: the gateway may have acted
            got = failed.outcome
        assert (got, raw.connections) == expected
    await client.close()


# -- out of descriptors ---------------------------------------------------------------------


@contextlib.contextmanager
def out_of_descriptors() -> Iterator[None]:
    """Every descriptor this process may open is taken (a low RLIMIT_NOFILE, filled)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 8, hard))
    fillers: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        yield
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_out_of_descriptors_is_a_local_failure() -> None:
    client = UpstreamClient()
    async with raw_server(answering(OK)) as raw:
        with out_of_descriptors():
            failed = await failure(client, raw.port)
        assert (failed.outcome, failed.sent) == (Outcome.LOCAL, False)
        assert "Too many open files" in failed.detail
        assert client.open_count(raw.origin) == 0
        assert (await attempt(client, raw.port)).status == 200
    await client.close()


# -- through payswitch ----------------------------------------------------------------------


def rules(*ports: int, methods: str = "[GET, POST]") -> str:
    """g1 in eu, first choice; any others in us, the fallback region, in order."""
    gws = "\n".join(
        f'  g{i}: {{url: "http://{HOST}:{p}", region: {"eu" if i == 1 else "us"}, weight: {100 - i}}}'
        for i, p in enumerate(ports, 1)
    )
    names = ", ".join(f"g{i}" for i in range(1, len(ports) + 1))
    return f"""
gateways:
{gws}
routes:
  - name: pay
    match: {{path_prefix: /, methods: {methods}}}
    region: {{default: eu{", fallback: {eu: [us]}" if len(ports) > 1 else ""}}}
    gateways: [{names}]
    retry: {{attempts: 1, on: [connect-failure, reset], after_ambiguous: never}}
"""


async def test_gets_survive_a_gateway_that_closes_pooled_connections(tmp_path: Path) -> None:
    async with (
        raw_server(closing_after_read(False, "close")) as g1,
        running_proxy(rules(g1.port), tmp_path) as proxy,
    ):
        statuses = [(await proxy.request("GET", "/v1/status", data=None))[0] for _ in range(10)]
        assert statuses == [200] * 10  # not one 502
        assert g1.connections == 10  # every GET after the first lost its pooled connection
        # A POST lost the same way was read by the gateway: ambiguous, never resent.
        status, _, body = await proxy.post("/v1/pay")
        assert (status, orjson.loads(body)["title"]) == (502, "Payment outcome unknown")
        assert g1.requests[-1].startswith(b"POST /v1/pay") and g1.connections == 10


async def test_a_post_to_a_restarted_gateway_goes_elsewhere_unsent(tmp_path: Path) -> None:
    async with (
        raw_server(answering(OK, OK, OK)) as g1,
        raw_server(answering(b"HTTP/1.1 201 Created\r\nContent-Length: 0\r\n\r\n")) as g2,
        running_proxy(rules(g1.port, g2.port, methods="[POST]"), tmp_path) as proxy,
    ):
        p = proxy.rt
        first, headers, _ = await proxy.post("/v1/pay")
        assert (first, headers["X-Payswitch-Gateway"]) == (200, "g1")
        g1.stop()
        status, headers, _ = await proxy.post("/v1/pay")
        # attempts: 1 and after_ambiguous: never, yet g2 answered: g1's attempt sent nothing.
        assert (status, headers["X-Payswitch-Gateway"]) == (201, "g2")
        assert len(g1.requests) == 1
        assert p.states["g1"].failures == 1  # a connect failure: the gateway's, not ours


async def test_out_of_descriptors_is_answered_503_and_spares_the_gateways(tmp_path: Path) -> None:
    async with (
        raw_server(answering(OK)) as g1,
        raw_server(answering(OK)) as g2,
        running_proxy(rules(g1.port, g2.port, methods="[POST]"), tmp_path) as proxy,
    ):
        reader, writer = await asyncio.open_connection(HOST, proxy.server.port)
        await asyncio.sleep(0.05)  # accepted: the client's connection needs no new descriptor
        with out_of_descriptors():
            writer.write(b"POST /v1/pay HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            body = await reader.readexactly(length)
        writer.close()
        assert head.startswith(b"HTTP/1.1 503 ")
        problem = orjson.loads(body)
        assert "could not open a connection" in problem["detail"]
        assert [t["outcome"] for t in problem["tried"]] == ["local_failure"] * 2
        assert [proxy.rt.states[g].failures for g in ("g1", "g2")] == [0, 0]
        assert (g1.connections, g2.connections) == (0, 0)


# -- the same on uvloop, the loop payswitch serves on ---------------------------------------

ON_UVLOOP: dict[str, Callable[[], Coroutine[Any, Any, None]]] = {
    "progress": test_progress_follows_the_exchange,
    "cap": test_the_connection_cap_is_a_local_refusal_that_sent_nothing,
    "closed-idle": functools.partial(test_a_close_already_received_is_never_written_to, False),
    "restarted": functools.partial(test_a_close_already_received_is_never_written_to, True),
    "get-resent": functools.partial(
        test_a_reused_connection_lost_before_any_answer, "GET", "close", False, (200, 2)
    ),
    "emfile": test_out_of_descriptors_is_a_local_failure,
}


@pytest.mark.parametrize("scenario", ON_UVLOOP.values(), ids=ON_UVLOOP.keys())
def test_on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(scenario())


@contextlib.asynccontextmanager
async def restartable_gateway() -> AsyncIterator[tuple[int, Callable[[], Awaitable[None]]]]:
    """An aiohttp gateway on a fixed port, and a restart: every open connection closed,
    then listening again on the same port."""
    app = web.Application()

    async def ok(request: web.Request) -> web.Response:
        await request.read()
        return web.json_response({"status": "succeeded"})

    app.router.add_route("*", "/{tail:.*}", ok)
    runners = [web.AppRunner(app, access_log=None)]
    await runners[0].setup()
    await web.TCPSite(runners[0], HOST, 0, reuse_address=True).start()
    port = int(next(iter(runners[0].addresses))[1])

    async def restart() -> None:
        await runners[-1].cleanup()
        runners.append(web.AppRunner(app, access_log=None))
        await runners[-1].setup()
        await web.TCPSite(runners[-1], HOST, port, reuse_address=True).start()

    try:
        yield port, restart
    finally:
        await runners[-1].cleanup()


async def test_a_gateway_restart_loses_no_request(tmp_path: Path) -> None:
    async with (
        restartable_gateway() as (port, restart),
        running_proxy(rules(port), tmp_path) as proxy,
    ):
        gets = [proxy.request("GET", "/v1/status", data=None) for _ in range(20)]
        first = await asyncio.gather(*gets)  # 20 pooled connections
        await restart()
        gets = [proxy.request("GET", "/v1/status", data=None) for _ in range(20)]
        posts = [proxy.post("/v1/pay") for _ in range(20)]
        after = await asyncio.gather(*gets, *posts)
        assert [s for s, _, _ in first + after] == [200] * 60
