"""The listener's bookkeeping of connections: admission against the cap, refusals
counted, and the drain flag every answer reads."""

from __future__ import annotations

import asyncio
import errno
import socket

import pytest
from prometheus_client import CollectorRegistry

from proxy.server import ConnectionCap, ProxyServer
from proxy.server.connection import Connection, Phase
from proxy.server.listener import listening_socket
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


# -- the listening socket, bound by payswitch when the host is an address ------------------


def test_an_ip_address_is_bound_here_and_a_host_name_left_to_the_loop() -> None:
    for host in ("127.0.0.1", "0.0.0.0"):
        sock = listening_socket(host, 0, backlog=16, reuse_port=False)
        assert sock is not None
        with sock:
            assert sock.getsockname()[0] == host and sock.getsockname()[1] > 0
            assert sock.getblocking() is False
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
            assert not sock.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT)
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    assert listening_socket("localhost", 0, backlog=16, reuse_port=False) is None
    assert listening_socket("", 0, backlog=16, reuse_port=False) is None  # every interface


def test_an_ipv6_address_listens_on_ipv6_only() -> None:
    sock = listening_socket("::1", 0, backlog=16, reuse_port=False)
    assert sock is not None
    with sock:
        assert sock.family == socket.AF_INET6 and sock.getsockname()[0] == "::1"
        assert sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def test_reuse_port_lets_two_sockets_share_a_port_and_a_taken_port_is_refused() -> None:
    first = listening_socket("127.0.0.1", 0, backlog=16, reuse_port=True)
    assert first is not None
    with first:
        port = first.getsockname()[1]
        second = listening_socket("127.0.0.1", port, backlog=16, reuse_port=True)
        assert second is not None
        second.close()
        with pytest.raises(OSError) as caught:
            listening_socket("127.0.0.1", port, backlog=16, reuse_port=False)
    assert caught.value.errno == errno.EADDRINUSE
    assert str(caught.value) == (
        f"[Errno {errno.EADDRINUSE}] error while attempting to bind on address "
        f"('127.0.0.1', {port}): address already in use"
    )


async def test_a_listener_on_an_address_serves_and_one_on_a_host_name_too() -> None:
    for host in ("127.0.0.1", "localhost"):
        server = ProxyServer(Gate(), lambda: 1024)
        await server.start(host, 0)
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", server.port)
            writer.close()
            await writer.wait_closed()
        finally:
            await server.close(0.1)
