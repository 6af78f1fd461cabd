"""The connect bench: both ways connect, each gives one line per concurrency."""

from __future__ import annotations

import asyncio
import socket
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import connect


def test_both_ways_connect_and_print_a_line_each() -> None:
    lines = uvloop.run(connect.run(40, [1, 4], 1))
    assert [line.split()[2] for line in lines] == ["loop.sock_connect", "client"] * 2
    assert all(" conn/s " in line and line.endswith(" us") for line in lines)
    assert all(len(line) <= 100 for line in lines)


def test_a_refused_connect_is_an_error_on_both_ways() -> None:
    async def refused(way: connect.Connect) -> BaseException:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            address = sock.getsockname()
        with socket.socket() as sock:
            sock.setblocking(False)
            try:
                await way(asyncio.get_running_loop(), sock, address)
            except OSError as exc:
                return exc
        raise AssertionError("connected to a port nobody listens on")

    for way in connect.WAYS.values():
        assert isinstance(uvloop.run(refused(way)), ConnectionRefusedError)
