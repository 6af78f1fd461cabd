"""LineWriter never blocks and counts what it drops; one encoder for every log line."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider

from proxy import logs
from proxy.logs import LineWriter, WriterHandler, encode, formatter, iso_millis

RFC3339_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        with contextlib.suppress(OSError):
            os.close(fd)


def _read_all(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            chunk = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not chunk:
            return out
        out += chunk


def _wait_for(r: int, count: int, within: float) -> bytes:
    got, deadline = b"", time.monotonic() + within
    while got.count(b"\n") < count and time.monotonic() < deadline:
        got += _read_all(r)
        time.sleep(0.002)
    return got


def test_lines_reach_the_descriptor_in_order(pipe: tuple[int, int]) -> None:
    r, w = pipe
    writer = LineWriter(w, name="t")
    for i in range(100):
        assert writer.offer(b"%d\n" % i)
    assert writer.flush(5)
    assert _read_all(r).splitlines() == [b"%d" % i for i in range(100)]
    assert (writer.written, writer.dropped) == (100, 0)


def test_a_reader_that_stopped_never_blocks_the_writer_and_drops_are_counted(
    pipe: tuple[int, int],
) -> None:
    r, w = pipe
    writer = LineWriter(w, name="t", capacity=64 << 10)
    line = b"x" * 1023 + b"\n"
    started = time.monotonic()
    accepted = sum(writer.offer(line) for _ in range(2000))  # 2 MiB into a 64 KiB pipe
    assert time.monotonic() - started < 0.5
    assert 0 < accepted < 2000
    assert writer.dropped == 2000 - accepted
    # Once the reader catches up, every accepted line arrives whole.
    got = _wait_for(r, accepted, 10)
    assert got.count(b"\n") == accepted
    assert set(got.splitlines()) == {line[:-1]}


@pytest.mark.parametrize("given", [None, 3], ids=["counted-here", "given-by-caller"])
def test_batches_count_as_their_lines_written_or_dropped(
    pipe: tuple[int, int], given: int | None
) -> None:
    r, w = pipe
    writer = LineWriter(w, name="t", capacity=16)
    assert writer.offer(b"a\nb\nc\n", given)
    assert writer.flush(5)
    assert _read_all(r) == b"a\nb\nc\n"
    assert not writer.offer(b"d\ne\nf\n" * 3, None if given is None else 9)  # over capacity
    assert (writer.written, writer.dropped) == (3, 9)


def test_a_closed_reader_counts_as_drops(pipe: tuple[int, int]) -> None:
    r, w = pipe
    os.close(r)
    writer = LineWriter(w, name="t")
    writer.offer(b"a\nb\n")
    assert writer.flush(5)
    assert writer.dropped == 2


def test_close_gives_up_on_a_stuck_reader_within_its_timeout(pipe: tuple[int, int]) -> None:
    r, w = pipe
    writer = LineWriter(w, name="t", capacity=1 << 20)
    for _ in range(200):
        writer.offer(b"y" * 4095 + b"\n")
    started = time.monotonic()
    writer.close(0.2)
    assert time.monotonic() - started < 1.0
    assert writer.dropped > 0
    dropped = writer.dropped
    writer.close(0.1)  # again, as atexit does after an uncaught exception closed it
    assert writer.dropped == dropped
    assert not writer.offer(b"late\n")
    # The reader comes back: the thread finishes the write it was in and stops. (Left
    # stuck, it would write into whatever pipe reuses these descriptor numbers next.)
    deadline = time.monotonic() + 10
    while writer._thread.is_alive() and time.monotonic() < deadline:
        _read_all(r)
        time.sleep(0.005)
    assert not writer._thread.is_alive()


def test_a_busy_writer_is_never_woken_by_an_offer(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    r, w = pipe
    writer = LineWriter(w, name="t")
    rings = 0
    ring = writer._ring

    def counted() -> None:
        nonlocal rings
        rings += 1
        ring()

    assert writer.offer(b"first\n")  # a fresh writer is polling: no ring either
    monkeypatch.setattr(writer, "_ring", counted)
    for i in range(50):
        assert writer.offer(b"%d\n" % i)
        time.sleep(0.002)
    got = _wait_for(r, 51, 5)
    assert got.splitlines() == [b"first"] + [b"%d" % i for i in range(50)]
    assert rings == 0


def test_a_parked_writer_wakes_on_the_next_offer(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(logs, "PARK_AFTER", 2)
    monkeypatch.setattr(logs, "POLL_INTERVAL", 0.005)
    r, w = pipe
    writer = LineWriter(w, name="t")
    deadline = time.monotonic() + 5
    while not writer._parked and time.monotonic() < deadline:
        time.sleep(0.005)
    assert writer._parked
    monkeypatch.setattr(logs, "POLL_INTERVAL", 60.0)  # only the ring can get it out now
    started = time.monotonic()
    assert writer.offer(b"late\n")
    assert _wait_for(r, 1, 5) == b"late\n"
    assert time.monotonic() - started < 1.0
    assert writer.flush(5)
    assert (writer.written, writer.dropped) == (1, 0)


@pytest.mark.parametrize(
    ("ts", "text"),
    [
        (0.0, "1970-01-01T00:00:00.000Z"),
        (1_700_000_000.25, "2023-11-14T22:13:20.250Z"),
        (1_700_000_000.999, "2023-11-14T22:13:20.999Z"),
    ],
    ids=["epoch", "quarter", "last-milli"],
)
def test_timestamps_are_rfc3339_utc_millis(ts: float, text: str) -> None:
    assert iso_millis(ts) == text


def test_access_record_gets_time_from_ts_and_no_ts() -> None:
    line = encode({"log": "access", "ts": 1_700_000_000.25, "status": 200})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line) == {"log": "access", "time": "2023-11-14T22:13:20.250Z", "status": 200}


def test_lines_made_inside_a_span_carry_its_ids() -> None:
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("t")
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        record = json.loads(encode({"log": "access"}))
        app = json.loads(formatter().format(_record("inside")))
    assert record["trace_id"] == app["trace_id"] == format(ctx.trace_id, "032x")
    assert record["span_id"] == app["span_id"] == format(ctx.span_id, "016x")
    assert "trace_id" not in json.loads(encode({"log": "access"}))


def test_with_tracing_off_the_access_log_does_not_look_for_a_span() -> None:
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("t")
    with tracer.start_as_current_span("request"):
        record = json.loads(encode({"log": "access"}, trace_ids=False))
    assert "trace_id" not in record and "span_id" not in record


def _record(msg: str, *args: object, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("boom\nsecond line")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("proxy.x", logging.ERROR, __file__, 1, msg, args, exc_info)


@pytest.mark.parametrize(
    ("record", "expect"),
    [
        (_record("plain %s", "arg"), {"msg": "plain arg", "level": "error", "logger": "proxy.x"}),
        (_record("rules refused:\n  a.yaml:1: bad\n  b.yaml:2: worse"), {"level": "error"}),
        (_record("with traceback", exc=True), {"msg": "with traceback"}),
    ],
    ids=["args", "multi-line", "exception"],
)
def test_app_records_are_one_json_object_per_line(
    record: logging.LogRecord, expect: dict[str, str]
) -> None:
    text = formatter().format(record)
    assert "\n" not in text
    obj = json.loads(text)
    assert expect.items() <= obj.items()
    assert RFC3339_MS.match(obj["time"])
    if record.exc_info:
        assert "ValueError: boom" in obj["exception"]


def test_extra_fields_become_keys(pipe: tuple[int, int]) -> None:
    r, w = pipe
    handler = WriterHandler(LineWriter(w, name="t"))
    handler.setFormatter(formatter())
    log = logging.getLogger("test.logs.extra")
    log.propagate = False
    log.addHandler(handler)
    try:
        log.warning("refused", extra={"problems": ["a", "b"]})
        assert handler.writer.flush(5)
    finally:
        log.removeHandler(handler)
    obj = json.loads(_read_all(r))
    assert obj["problems"] == ["a", "b"]
    assert obj["msg"] == "refused"


# -- several processes on one stdout ------------------------------------------------------

CUTS = {
    "short lines together": ([100, 200, 300], [603]),
    "cut at the last line end that fits": ([3000, 2000], [3001, 2001]),
    "a line over the limit alone": ([10, 5000, 10], [11, 5001, 11]),
    "exactly the limit": ([4095, 1], [4096, 2]),
}


@pytest.mark.parametrize(("lines", "pieces"), CUTS.values(), ids=CUTS)
def test_shared_writes_are_whole_lines_within_pipe_buf(lines: list[int], pieces: list[int]) -> None:
    from proxy.logs import _whole_lines

    data = b"".join(b"x" * n + b"\n" for n in lines)
    got = list(_whole_lines(data))
    assert [len(p) for p in got] == pieces
    assert b"".join(got) == data


# Forking from a test process that may run threads (Python 3.12 warns); the child
# makes a few plain calls and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_two_processes_sharing_a_pipe_never_split_a_line() -> None:
    """Two forked writers push big batches into one pipe; every line arrives whole."""
    r, w = os.pipe()
    children = []
    for tag in (b"a", b"b"):
        pid = os.fork()
        if pid == 0:
            os.close(r)
            import proxy.logs as logs

            logs.share_outputs()
            writer = LineWriter(w, name="shared")
            for _ in range(20):
                writer.offer(b"".join(tag * 900 + b"\n" for _ in range(50)))
            writer.close(10.0)
            os._exit(0)
        children.append(pid)
    os.close(w)
    data = b""
    while chunk := os.read(r, 65536):
        data += chunk
    os.close(r)
    for pid in children:
        assert os.waitpid(pid, 0)[1] == 0
    lines = data.split(b"\n")[:-1]
    assert len(lines) == 2000
    assert all(line in (b"a" * 900, b"b" * 900) for line in lines)
