"""The access log: one JSON line per record, queued, never waiting on its output."""

from __future__ import annotations

import json
import os
import time

from proxy.accesslog import AccessLog
from proxy.logs import LineWriter


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
