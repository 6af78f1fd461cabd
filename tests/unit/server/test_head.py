"""Request heads under the limits, fed to a connection over a memory transport."""

from __future__ import annotations

import pytest

from proxy.server.limits import MAX_FIELD, MAX_HEADERS, MAX_TARGET
from tests.unit.server.memory import connection, settle


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"a" * MAX_TARGET + b" HTTP/1.1\r\nHost: t\r\n\r\n", 414),
        (b"GET / HTTP/1.1\r\nX: " + b"v" * MAX_FIELD + b"\r\n\r\n", 431),
        (b"GET / HTTP/1.1\r\n" + b"X: 1\r\n" * (MAX_HEADERS + 1) + b"\r\n", 431),
        (b"POST / HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
        (b"GET / HTTP/1.1\r\nHost: t\r\nExpect: later\r\n\r\n", 417),
        (b"GET / HTTP/2.0\r\nHost: t\r\n\r\n", 505),
        (b"GET / HTTP/1.1\r\n\r\n", 400),
        (b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
    ],
    ids=[
        "target",
        "field",
        "field-count",
        "coding",
        "expect",
        "version",
        "no-host",
        "two-hosts",
    ],
)
async def test_a_head_over_a_limit_is_refused(raw: bytes, status: int) -> None:
    conn, transport, gate = connection()
    conn.data_received(raw)
    await settle()
    assert transport.take().startswith(b"HTTP/1.1 %d " % status)
    assert gate.seen == []


@pytest.mark.parametrize(
    ("raw", "host", "length", "expect", "keep_alive"),
    [
        (b"GET / HTTP/1.1\r\nHost: t\r\n\r\n", "t", None, False, True),
        (b"GET / HTTP/1.1\r\nHost: t \t\r\n\r\n", "t", None, False, True),
        (b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 2\r\n\r\n{}", "t", 2, False, True),
        (
            b"POST / HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\nExpect: 100-continue\r\n\r\n",
            "t",
            0,
            True,
            True,
        ),
        (b"GET / HTTP/1.0\r\nExpect: 100-continue\r\n\r\n", None, None, False, False),
        (b"GET / HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n", "t", None, False, False),
    ],
    ids=["plain", "trailing-ows", "length", "continue", "http-1-0", "close"],
)
async def test_a_head_becomes_a_request(
    raw: bytes, host: str | None, length: int | None, expect: bool, keep_alive: bool
) -> None:
    conn, _transport, gate = connection()
    gate.open.clear()
    conn.data_received(raw)
    await settle()
    (req,) = gate.seen
    assert (req.host, req.content_length, req.keep_alive) == (host, length, keep_alive)
    assert req.expect_continue is expect
    assert not conn.head.in_head
