"""The supervisor's log: JSON lines through a buffer its loop writes, never blocking."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

import orjson
import pytest

from proxy.worker_log import SupervisorLog


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    os.set_blocking(r, False)
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def _handler(fd: int, capacity: int = 1 << 16) -> tuple[SupervisorLog, logging.Logger]:
    from proxy.logs import formatter

    handler = SupervisorLog(fd, capacity=capacity)
    handler.setFormatter(formatter())
    log = logging.getLogger(f"test.worker_log.{id(handler)}")
    log.propagate = False
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    return handler, log


def test_lines_wait_for_the_loop_then_are_json(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler, log = _handler(w)
    log.error("worker %d died", 1, extra={"worker": 1})
    assert handler.pending
    with pytest.raises(BlockingIOError):
        os.read(r, 1)  # nothing written by the logging call itself
    handler.flush_some()
    line = orjson.loads(os.read(r, 65536))
    assert (line["msg"], line["worker"], line["level"]) == ("worker 1 died", 1, "error")
    assert not handler.pending


def test_a_reader_that_stops_costs_lines_not_a_stuck_supervisor(pipe: tuple[int, int]) -> None:
    _, w = pipe
    handler, log = _handler(w, capacity=4096)
    for i in range(200):
        log.info("line %d %s", i, "x" * 100)
    assert handler.dropped > 150  # the buffer holds ~30 lines
    # Fill the pipe so it takes nothing more, then flushing returns at once.
    os.set_blocking(w, False)
    try:
        while True:
            os.write(w, b"y" * 65536)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    assert handler.flush_all(0.2) is False
    assert handler.pending


def test_a_reader_gone_drops_everything(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler, log = _handler(w)
    log.info("one")
    log.info("two")
    os.close(r)
    handler.flush_some()
    assert not handler.pending
    assert handler.dropped == 2


def test_long_lines_go_out_whole(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler, log = _handler(w)
    log.info("%s", "z" * 10000)
    assert handler.flush_all(1.0)
    data = b""
    while True:
        try:
            data += os.read(r, 65536)
        except BlockingIOError:
            break
    assert orjson.loads(data)["msg"] == "z" * 10000
