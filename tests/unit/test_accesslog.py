"""The access log: one JSON line per record, queued, never waiting on its output."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider

from proxy.accesslog import LINGER, AccessLog
from proxy.logs import LineWriter, encode


def test_records_are_json_lines_with_rfc3339_time() -> None:
    r, w = os.pipe()
    try:
        log = AccessLog(LineWriter(w, name="access"))
        log.log({"log": "access", "ts": 1_700_000_000.5, "status": 201, "tried": ()})
        log.log({"log": "access", "status": 502})
        assert log._writer.flush(5)
        lines = os.read(r, 1 << 16).splitlines()
    finally:
        os.close(r)
        os.close(w)
    first, second = (json.loads(x) for x in lines)
    assert first == {
        "log": "access",
        "time": "2023-11-14T22:13:20.500Z",
        "status": 201,
        "tried": [],
    }
    assert second["status"] == 502 and second["time"].endswith("Z") and "ts" not in second


def test_a_stuck_output_drops_and_counts_without_waiting() -> None:
    r, w = os.pipe()
    try:
        log = AccessLog(LineWriter(w, name="access", capacity=32 << 10))
        started = time.monotonic()
        for i in range(20_000):
            log.log({"log": "access", "n": i, "path": "/v1/deposits" * 10})
        assert time.monotonic() - started < 2.0
        assert log.dropped > 0
    finally:
        os.close(r)
        os.close(w)


async def _batched(records: list[dict[str, object]], batch_max: int, out: Path) -> list[bytes]:
    w = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        log = AccessLog(LineWriter(w, name="access"), trace_ids=False, batch_max=batch_max)
        for record in records:
            log.add(record)
        await asyncio.sleep(LINGER * 3)
        assert log._writer.flush(5)
        return (await asyncio.to_thread(out.read_bytes)).splitlines()
    finally:
        os.close(w)


@pytest.mark.parametrize(
    ("count", "batch_max"),
    [(1, 1024), (3, 1024), (5, 2), (2000, 1024)],
    ids=["one", "a-few", "batches-of-two", "more-than-a-batch"],
)
async def test_added_records_are_written_as_logged_ones_in_order(
    count: int, batch_max: int, tmp_path: Path
) -> None:
    records: list[dict[str, object]] = [
        {"log": "access", "ts": 1_700_000_000.5 + i, "status": 200, "n": i, "tried": ()}
        for i in range(count)
    ]
    expected = [encode(dict(x), trace_ids=False).rstrip(b"\n") for x in records]
    assert await _batched(records, batch_max, tmp_path / "out") == expected


async def test_a_full_batch_is_handed_over_at_once_and_a_partial_one_after_the_linger() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w, name="access")
        log = AccessLog(writer, trace_ids=False, linger=0.05, batch_max=3)
        for i in range(4):
            log.add({"log": "access", "n": i})
        assert writer.flush(5)
        first = [json.loads(x)["n"] for x in os.read(r, 1 << 16).splitlines()]
        assert first == [0, 1, 2], "the full batch, written before any wait"
        await asyncio.sleep(0.15)
        assert writer.flush(5)
        assert [json.loads(x)["n"] for x in os.read(r, 1 << 16).splitlines()] == [3]
    finally:
        os.close(r)
        os.close(w)


async def test_close_writes_what_waits_and_later_records_go_out_one_by_one() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w, name="access")
        log = AccessLog(writer, trace_ids=False, linger=60.0)
        log.add({"log": "access", "n": 0})
        await log.close()
        log.add({"log": "access", "n": 1})
        assert writer.flush(5)
        assert [json.loads(x)["n"] for x in os.read(r, 1 << 16).splitlines()] == [0, 1]
    finally:
        os.close(r)
        os.close(w)


async def test_trace_ids_are_those_of_the_span_current_when_the_record_was_added() -> None:
    provider = TracerProvider()
    r, w = os.pipe()
    try:
        writer = LineWriter(w, name="access")
        log = AccessLog(writer, trace_ids=True, linger=0.01)
        with provider.get_tracer("test").start_as_current_span("request") as span:
            log.add({"log": "access"})
            ctx = span.get_span_context()
        await asyncio.sleep(0.1)
        assert writer.flush(5)
        record = json.loads(os.read(r, 1 << 16))
    finally:
        os.close(r)
        os.close(w)
    assert list(record) == ["time", "log", "trace_id", "span_id"]
    assert record["trace_id"] == format(ctx.trace_id, "032x")
    assert record["span_id"] == format(ctx.span_id, "016x")
