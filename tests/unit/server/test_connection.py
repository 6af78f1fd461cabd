"""One connection driven byte by byte over a memory transport: its phase, its queue of
pipelined requests, and flow control."""

from __future__ import annotations

import pytest

from proxy.server.connection import Phase
from proxy.server.limits import MAX_PIPELINED
from tests.unit.server.memory import connection, phase, settle

GET = b"GET /%d HTTP/1.1\r\nHost: t\r\n\r\n"


async def test_requests_are_answered_in_order_and_the_connection_stays_open() -> None:
    conn, transport, _gate = connection()
    conn.data_received(GET % 1 + GET % 2)
    await settle()
    out = transport.take()
    assert out.count(b"HTTP/1.1 200 OK") == 2 and b"Connection" not in out
    assert phase(conn) is Phase.READING and conn.idle()
    assert conn.started == 2


async def test_a_refusal_stops_reading_and_lingers() -> None:
    conn, transport, gate = connection()
    conn.data_received(b"NOT HTTP\r\n\r\n")
    await settle()
    assert transport.take().startswith(b"HTTP/1.1 400 Bad Request\r\n")
    assert phase(conn) is Phase.LINGERING and transport.eof_written and transport.is_reading()
    conn.data_received(GET % 1)  # what the client still sends is read and dropped
    await settle()
    assert gate.seen == [] and transport.take() == b""
    conn.close(lingering=True)
    assert phase(conn) is Phase.LINGERING  # already shut; not shut again
    conn.close()
    assert phase(conn) is Phase.CLOSING and transport.was_closed()


async def test_phases_only_move_forward() -> None:
    conn, transport, _gate = connection()
    conn.abort()
    assert phase(conn) is Phase.ABORTED and transport.was_aborted()
    conn.close()
    conn.stop_reading()
    assert phase(conn) is Phase.ABORTED
    conn.connection_lost(None)
    assert phase(conn) is Phase.CLOSED and not conn.open


async def test_reading_pauses_while_too_many_requests_wait_and_resumes_after() -> None:
    conn, transport, gate = connection()
    gate.open.clear()
    conn.data_received(b"".join(GET % i for i in range(MAX_PIPELINED + 2)))
    await settle()
    assert len(conn.waiting) == MAX_PIPELINED + 1
    assert conn.read_paused and not transport.is_reading()
    gate.open.set()
    for _ in range(MAX_PIPELINED + 2):
        await settle()
    assert transport.take().count(b"HTTP/1.1 200") == MAX_PIPELINED + 2
    assert transport.is_reading() and not conn.read_paused


async def test_the_next_request_waits_while_the_client_is_not_reading() -> None:
    conn, _transport, gate = connection()
    conn.pause_writing()
    conn.data_received(GET % 1 + GET % 2)
    await settle()
    assert [r.raw_path for r in gate.seen] == ["/1"] and conn.held
    conn.resume_writing()
    await settle()
    assert [r.raw_path for r in gate.seen] == ["/1", "/2"] and not conn.held


@pytest.mark.parametrize(
    ("owed", "keep_open"), [(False, False), (True, True)], ids=["nothing-owed", "answer-owed"]
)
async def test_a_half_close_keeps_the_write_side_only_for_answers_owed(
    owed: bool, keep_open: bool
) -> None:
    conn, _transport, gate = connection()
    if owed:
        gate.open.clear()
        conn.data_received(GET % 1)
        await settle()
    assert conn.eof_received() is keep_open
    assert phase(conn) is Phase.STOPPED and conn.eof


async def test_a_body_arriving_for_a_request_is_handed_over_whole() -> None:
    conn, transport, gate = connection()
    conn.data_received(b"POST /p HTTP/1.1\r\nHost: t\r\nContent-Length: 6\r\n\r\nabc")
    await settle()
    assert not conn.idle()
    conn.data_received(b"def")
    await settle()
    assert transport.take().endswith(b"ok:abcdef")
    assert gate.seen[0].size == 6 and conn.idle()
