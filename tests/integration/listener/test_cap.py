"""The connection cap on a real listener: connections over it get a 503 problem and are
closed, counted by reason; those under it are served as before."""

from __future__ import annotations

import orjson
from prometheus_client import CollectorRegistry

from proxy.server import ConnectionCap, ProxyServer
from tests.integration.listener.test_server import HOST, Echo, closed, connect, post, read_answer
from tests.support import eventually


def refusals(registry: CollectorRegistry, reason: str) -> float:
    value = registry.get_sample_value("payswitch_listener_refusals_total", {"reason": reason})
    return value or 0.0


async def test_connections_over_the_cap_are_refused_and_counted() -> None:
    registry = CollectorRegistry()
    cap = ConnectionCap(2, registry=registry)
    server = ProxyServer(Echo(), lambda: 1024, cap)
    await server.start(HOST, 0)
    try:
        held = [await connect(server) for _ in range(2)]
        await eventually(lambda: cap.open == 2)
        assert registry.get_sample_value("payswitch_listener_connections") == 2
        assert cap.overloaded

        for _ in range(3):
            reader, writer = await connect(server)
            status, headers, body = await read_answer(reader)
            assert (status, headers["connection"], headers["retry-after"]) == (503, "close", "1")
            assert orjson.loads(body)["type"].endswith("/max-connections")
            assert await closed(reader)
            writer.close()
        assert refusals(registry, "max_connections") == 3
        assert len(server.conns) == 2

        # The connections under the cap are served as before.
        reader, writer = held[0]
        writer.write(post("/pay", b"{}"))
        assert (await read_answer(reader))[2] == b"echo:{}"

        # One closing makes room for one more.
        held[1][1].close()
        await eventually(lambda: cap.open == 1)
        reader, writer = await connect(server)
        writer.write(post("/next", b"1"))
        assert (await read_answer(reader))[:1] == (200,)
        writer.close()
        held[0][1].close()
    finally:
        await server.close(1.0)
    assert cap.open == 0


async def test_request_refusals_are_counted_by_reason() -> None:
    registry = CollectorRegistry()
    server = ProxyServer(Echo(), lambda: 1024, ConnectionCap(10, registry=registry))
    await server.start(HOST, 0)
    try:
        for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/2.0\r\nHost: t\r\n\r\n"):
            reader, writer = await connect(server)
            writer.write(raw)
            assert (await read_answer(reader))[0] in (400, 505)
            writer.close()
    finally:
        await server.close(1.0)
    assert refusals(registry, "malformed") == 1
    assert refusals(registry, "unsupported") == 1
    assert refusals(registry, "max_connections") == 0
