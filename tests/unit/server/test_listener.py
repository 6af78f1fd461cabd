"""The listener's bookkeeping of connections: admission against the cap, refusals
counted, and the drain flag every answer reads."""

from __future__ import annotations

import asyncio

from prometheus_client import CollectorRegistry

from proxy.server import ConnectionCap, ProxyServer
from proxy.server.connection import Connection, Phase
from tests.unit.server.memory import Gate, MemoryTransport, phase


def made(server: ProxyServer) -> tuple[Connection, MemoryTransport]:
    conn = Connection(server)
    transport = MemoryTransport()
    conn.connection_made(transport)
    return conn, transport


async def test_connections_are_admitted_up_to_the_cap_and_released() -> None:
    registry = CollectorRegistry()
    cap = ConnectionCap(1, registry=registry)
    server = ProxyServer(Gate(), lambda: 1024, cap)
    server.loop = asyncio.get_running_loop()
    first, _ = made(server)
    second, transport = made(server)
    assert first.admitted and not second.admitted
    assert server.conns == {first} and cap.open == 1
    out = transport.take()
    assert out.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
    assert b"Connection: close\r\n" in out and b"max-connections" in out
    assert transport.was_closed() and phase(second) is Phase.CLOSING
    second.connection_lost(None)
    assert cap.open == 1  # a refused connection was never counted
    first.connection_lost(None)
    assert cap.open == 0 and server.conns == set()
    labels = {"reason": "max_connections"}
    assert registry.get_sample_value("payswitch_listener_refusals_total", labels) == 1


async def test_drain_and_close_wind_the_listener_down() -> None:
    server = ProxyServer(Gate(), lambda: 1024)
    assert not server.winding_down
    server.drain()
    assert server.draining and server.winding_down
