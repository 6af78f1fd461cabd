"""The access log: one JSON line per record, queued, never waiting on its output."""

from __future__ import annotations

import asyncio
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

from proxy.accesslog import LINGER, AccessLog, AccessRecord, line
from proxy.errors import Tried
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


def _record(n: int, **changes: Any) -> AccessRecord:
    base = AccessRecord(
        1_700_000_000.5 + n,
        "POST",
        "/v1/deposits",
        200,
        "deposits",
        "eu",
        "g1",
        f"txn-{n}",
        (Tried(gateway="g0", outcome="connect-failure", attempt_id="a0"),),
        None,
        float(n),
        "127.0.0.1",
    )
    return base._replace(**changes)


def _as_dict(r: AccessRecord) -> dict[str, object]:
    """The same request as the dict the shared encoder takes."""
    return {
        "log": "access",
        "ts": r.ts,
        "method": r.method,
        "path": r.path,
        "status": r.status,
        "route": r.route,
        "region": r.region,
        "gateway": r.gateway,
        "transaction_id": r.transaction_id,
        "tried": [{"gateway": t.gateway, "outcome": t.outcome} for t in r.tried],
        "error": r.error,
        "duration_ms": r.duration_ms,
        "client": r.client,
    }


@pytest.mark.parametrize(
    "record",
    [
        _record(0),
        _record(1, tried=(), error="no-route", region=None, gateway=None, transaction_id=None),
        _record(2, path='/v1/"quoted"\\é', client=None, ts=1_700_000_000.999),
        _record(3, trace=("0" * 31 + "1", "0" * 15 + "2")),
    ],
    ids=["answered", "no-route", "escaped-text", "traced"],
)
def test_a_record_is_the_line_the_shared_encoder_makes_of_it(record: AccessRecord) -> None:
    fields = _as_dict(record)
    if record.trace is not None:
        fields["trace_id"], fields["span_id"] = record.trace
    assert line(record) == encode(fields, trace_ids=False)


async def _batched(records: list[AccessRecord], batch_max: int, out: Path) -> list[bytes]:
    w = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        log = AccessLog(LineWriter(w, name="access"), trace_ids=False, batch_max=batch_max)
        for record in records:
            log.request(record)
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
async def test_records_are_written_in_order_whatever_the_batches(
    count: int, batch_max: int, tmp_path: Path
) -> None:
    records = [_record(i) for i in range(count)]
    expected = [line(r).rstrip(b"\n") for r in records]
    assert await _batched(records, batch_max, tmp_path / "out") == expected


def _numbers(data: bytes) -> list[str]:
    return [json.loads(x)["transaction_id"] for x in data.splitlines()]


async def test_a_full_batch_is_handed_over_at_once_and_a_partial_one_after_the_linger() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w, name="access")
        log = AccessLog(writer, trace_ids=False, linger=0.05, batch_max=3)
        for i in range(4):
            log.request(_record(i))
        assert writer.flush(5)
        first = _numbers(os.read(r, 1 << 16))
        assert first == ["txn-0", "txn-1", "txn-2"], "the full batch, written before any wait"
        await asyncio.sleep(0.15)
        assert writer.flush(5)
        assert _numbers(os.read(r, 1 << 16)) == ["txn-3"]
    finally:
        os.close(r)
        os.close(w)


async def test_close_writes_what_waits_and_later_records_go_out_one_by_one() -> None:
    r, w = os.pipe()
    try:
        writer = LineWriter(w, name="access")
        log = AccessLog(writer, trace_ids=False, linger=60.0)
        log.request(_record(0))
        await log.close()
        log.request(_record(1))
        assert writer.flush(5)
        assert _numbers(os.read(r, 1 << 16)) == ["txn-0", "txn-1"]
    finally:
        os.close(r)
        os.close(w)


async def test_a_batch_that_cannot_be_encoded_is_logged_not_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no text")

    r, w = os.pipe()
    try:
        writer = LineWriter(w, name="access")
        log = AccessLog(writer, trace_ids=False, linger=60.0)
        log.request(_record(0, error=Unprintable()))
        log.flush()  # as the handler does after an answer: nothing raised into it
        assert "could not be encoded" in caplog.text
        log.request(_record(1))
        log.flush()
        assert writer.flush(5)
        assert _numbers(os.read(r, 1 << 16)) == ["txn-1"]
    finally:
        os.close(r)
        os.close(w)


async def test_trace_ids_are_those_of_the_span_current_when_the_record_was_made() -> None:
    provider = TracerProvider()
    r, w = os.pipe()
    try:
        writer = LineWriter(w, name="access")
        log = AccessLog(writer, trace_ids=True, linger=0.01)
        with provider.get_tracer("test").start_as_current_span("request") as span:
            log.request(_record(0))
            ctx = span.get_span_context()
        log.request(_record(1))  # no span: no ids
        await asyncio.sleep(0.1)
        assert writer.flush(5)
        traced, untraced = (json.loads(x) for x in os.read(r, 1 << 16).splitlines())
    finally:
        os.close(r)
        os.close(w)
    assert list(traced)[-2:] == ["trace_id", "span_id"]
    assert traced["trace_id"] == format(ctx.trace_id, "032x")
    assert traced["span_id"] == format(ctx.span_id, "016x")
    assert "trace_id" not in untraced
