"""The sweep's deadlines with the clock in the test's hands: no sleeping."""

from __future__ import annotations

from proxy.server.connection import Phase
from proxy.server.deadlines import sweep
from proxy.server.limits import DRAIN_IDLE, LINGER
from tests.unit.server.memory import connection, phase, settle

TIMEOUTS = {"keepalive_timeout": 10.0, "read_timeout": 5.0, "write_timeout": 7.0}


async def test_a_stalled_head_gets_408() -> None:
    conn, transport, _gate = connection(**TIMEOUTS)
    conn.data_received(b"GET / HTTP/1.1\r\nHost")
    start = conn.head.head_since
    sweep(conn, start + 4.9)
    assert transport.take() == b""
    sweep(conn, start + 5.1)
    assert transport.take().startswith(b"HTTP/1.1 408 ")


async def test_a_stalled_body_fails_the_handlers_read() -> None:
    conn, transport, gate = connection(**TIMEOUTS)
    conn.data_received(b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 9\r\n\r\nabc")
    await settle()
    (req,) = gate.seen
    sweep(conn, req.since + 5.1)
    await settle()
    assert transport.take().startswith(b"HTTP/1.1 500 ")  # the handler let BodyTimeout out
    assert req.error is not None and type(req.error).__name__ == "BodyTimeout"


async def test_an_idle_keep_alive_connection_closes_after_its_timeout() -> None:
    conn, transport, _gate = connection(**TIMEOUTS)
    conn.data_received(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    await settle()
    sweep(conn, conn.idle_since + 9.9)
    assert not transport.was_closed()
    sweep(conn, conn.idle_since + 10.1)
    assert transport.was_closed() and phase(conn) is Phase.CLOSING


async def test_while_draining_an_idle_connection_closes_after_drain_idle() -> None:
    conn, transport, _gate = connection(**TIMEOUTS)
    conn.server.drain()
    sweep(conn, conn.idle_since + DRAIN_IDLE / 2)
    assert not transport.was_closed()
    sweep(conn, conn.idle_since + DRAIN_IDLE + 0.1)
    assert transport.was_closed()


async def test_a_client_not_reading_is_cut_off_after_the_write_timeout() -> None:
    conn, transport, _gate = connection(**TIMEOUTS)
    conn.pause_writing()
    sweep(conn, conn.write_paused_at + 6.9)
    assert not transport.was_aborted()
    sweep(conn, conn.write_paused_at + 7.1)
    assert transport.was_aborted() and phase(conn) is Phase.ABORTED


async def test_a_lingering_close_ends_and_a_stuck_close_is_reset() -> None:
    conn, transport, _gate = connection(**TIMEOUTS)
    conn.data_received(b"NOT HTTP\r\n\r\n")
    await settle()
    assert phase(conn) is Phase.LINGERING
    sweep(conn, conn.phase_since + LINGER - 0.1)
    assert not transport.was_closed()
    sweep(conn, conn.phase_since + LINGER + 0.1)
    assert transport.was_closed() and phase(conn) is Phase.CLOSING
    sweep(conn, conn.phase_since + 7.1)
    assert transport.was_aborted()
