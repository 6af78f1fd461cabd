"""Tests for proxy.events: the kinds table, the schema, the bus and the stream sink."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jsonschema
import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import ManualClock
from proxy.config.load import ConfigIssue
from proxy.events import (
    KINDS,
    Event,
    EventBus,
    QueuedSink,
    RecordingEmitter,
    Severity,
    StreamSink,
    encode,
    encode_line,
    make_event,
    problems,
)
from proxy.logs import stdout_writer
from tests.support import eventually

SCHEMA_PATH = Path(__file__).resolve().parents[2] / "schemas" / "event.schema.json"

_TXN: dict[str, object] = {
    "transaction_id": "txn-1",
    "route": "deposits",
    "region": "eu",
    "gateway": "stripe-eu",
    "attempt_id": "att-1",
    "attempts": 1,
    "status": 200,
    "duration_ms": 12.5,
}

#: One realistic event of every kind, as producers emit them.
SAMPLES: dict[str, dict[str, object]] = {
    "config.loaded": {
        "generation": 2,
        "hash": "ab" * 32,
        "files": ["rules/gateways.yaml", "rules/routes.yaml"],
        "gateways": ["adyen-eu", "stripe-eu"],
        "routes": ["deposits"],
    },
    "config.rejected": {
        "issues": [
            {"file": "rules/routes.yaml", "line": 7, "pointer": "/routes/0", "message": "bad"}
        ],
        "trigger": "watch",
    },
    "gateway.ejected": {
        "gateway": "stripe-eu",
        "source": "passive",
        "reason": "5 consecutive failures",
        "duration_s": 5.0,
    },
    "gateway.restored": {"gateway": "stripe-eu", "source": "active", "reason": "2 checks passed"},
    "gateway.degraded": {"gateway": "stripe-eu", "score": 0.4, "reason": "latency 2.1x baseline"},
    "gateway.recovered": {"gateway": "stripe-eu", "score": 0.97},
    "gateway.all_down": {
        "route": "deposits",
        "region": "eu",
        "reasons": {"stripe-eu": "ejected", "adyen-eu": "active_failed"},
    },
    "gateway.throttled": {"gateway": "adyen-eu", "retry_after_s": 5},
    "gateway.drained": {"gateway": "adyen-eu"},
    "gateway.undrained": {"gateway": "adyen-eu"},
    "transaction.pending": {
        **_TXN,
        "gateway": None,
        "attempt_id": None,
        "attempts": 0,
        "status": None,
    },
    "transaction.succeeded": _TXN,
    "transaction.failed": {**_TXN, "status": 502, "attempts": 3},
    "transaction.unknown": {**_TXN, "status": None},
    "payment.duplicate_suspected": {
        "transaction_id": "txn-1",
        "route": "deposits",
        "attempts": [
            {"attempt_id": "att-1", "gateway": "stripe-eu", "status": 200},
            {"attempt_id": "att-2", "gateway": "stripe-us", "status": 201},
        ],
    },
    "payment.late_success": {
        "transaction_id": "txn-1",
        "route": "withdrawals",
        "attempt_id": "att-1",
        "gateway": "adyen-eu",
        "status": 200,
    },
    "control.applied": {
        "target": "gateway/stripe-eu",
        "action": "drain",
        "issuer": "ops@example.com",
        "reason": "provider incident",
        "expires_at": "2026-12-01T10:00:00Z",
    },
    "control.rejected": {"key": "gateway/stripe-eu", "error": "expires_at is in the past"},
    "control.expired": {"target": "gateway/stripe-eu", "action": "drain", "issuer": "ops"},
    "store.down": {"op": "claim", "error": "ConnectionError: Connection refused"},
    "store.up": {"down_s": 12.5},
    "worker.restarted": {
        "worker": 1,
        "pid": 4242,
        "previous_pid": 4100,
        "exit": "signal SIGKILL",
        "ran_s": 310.5,
    },
}


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


@pytest.fixture(scope="module")
def validator(schema: dict[str, Any]) -> jsonschema.Draft202012Validator:
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


async def run_bus(
    emits: Sequence[tuple[str, Severity, dict[str, object]]],
    *,
    min_severity: Severity = Severity.DEBUG,
) -> list[dict[str, Any]]:
    """Emit through a real bus into a stream sink and return the JSON lines written."""
    out = io.BytesIO()
    bus = EventBus([StreamSink(out, min_severity=min_severity)], clock=ManualClock())
    await bus.start()
    for kind, severity, fields in emits:
        bus.emit(kind, severity, **fields)
    await bus.close(grace=5.0)
    return [json.loads(line) for line in out.getvalue().splitlines()]


# -- the kinds table and the schema agree -------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "severity"),
    [
        ("gateway.ejected", Severity.CRITICAL),
        ("gateway.all_down", Severity.CRITICAL),
        ("payment.duplicate_suspected", Severity.CRITICAL),
        ("payment.late_success", Severity.CRITICAL),
        ("config.rejected", Severity.ERROR),
        ("gateway.throttled", Severity.WARNING),
        ("gateway.degraded", Severity.WARNING),
        ("config.loaded", Severity.INFO),
        ("gateway.restored", Severity.INFO),
        ("gateway.recovered", Severity.INFO),
        ("gateway.drained", Severity.INFO),
        ("transaction.succeeded", Severity.INFO),
    ],
    ids=lambda v: v if isinstance(v, str) else v.name,
)
def test_kind_default_severity(kind: str, severity: Severity) -> None:
    assert KINDS[kind].severity is severity


def test_samples_cover_every_kind() -> None:
    assert set(SAMPLES) == set(KINDS)


def test_schema_kind_enum_matches_kinds(schema: dict[str, Any]) -> None:
    assert schema["properties"]["kind"]["enum"] == list(KINDS)


def _schema_required(schema: dict[str, Any]) -> dict[str, list[str]]:
    """kind -> required field names, following each if/then to its $defs entry."""
    out: dict[str, list[str]] = {}
    for rule in schema["allOf"]:
        kind = rule["if"]["properties"]["kind"]["const"]
        node = rule["then"]["properties"]["fields"]
        while "$ref" in node:
            node = schema["$defs"][node["$ref"].removeprefix("#/$defs/")]
        out[kind] = node["required"]
    return out


def test_schema_required_fields_match_kinds(schema: dict[str, Any]) -> None:
    assert _schema_required(schema) == {k: list(s.required) for k, s in KINDS.items()}


@pytest.mark.parametrize("kind", list(KINDS))
async def test_emitted_sample_validates(
    kind: str, validator: jsonschema.Draft202012Validator
) -> None:
    [line] = await run_bus([(kind, KINDS[kind].severity, SAMPLES[kind])])
    validator.validate(line)
    assert line["kind"] == kind
    assert line["severity"] == KINDS[kind].severity.name.lower()
    assert line["fields"] == json.loads(json.dumps(SAMPLES[kind]))


@pytest.mark.parametrize("kind", list(KINDS))
def test_schema_refuses_sample_missing_a_required_field(
    kind: str, validator: jsonschema.Draft202012Validator
) -> None:
    fields = dict(SAMPLES[kind])
    del fields[KINDS[kind].required[0]]
    event = make_event(kind, KINDS[kind].severity, 1_700_000_000.0, fields)
    assert not validator.is_valid(json.loads(encode(event)))


@pytest.mark.parametrize(
    ("kind", "fields", "expected"),
    [
        ("gateway.drained", {"gateway": "g"}, ()),
        ("gateway.drained", {}, ("gateway.drained is missing gateway",)),
        (
            "gateway.ejected",
            {"gateway": "g", "reason": "x"},
            ("gateway.ejected is missing source, duration_s",),
        ),
        ("gateway.exploded", {"gateway": "g"}, ("unknown event kind 'gateway.exploded'",)),
    ],
    ids=["ok", "missing-one", "missing-two", "unknown-kind"],
)
def test_problems(kind: str, fields: dict[str, object], expected: tuple[str, ...]) -> None:
    assert problems(kind, fields) == expected


# -- envelope ------------------------------------------------------------------------------


def test_envelope_time_from_wall_clock() -> None:
    event = make_event("gateway.drained", Severity.INFO, 1_700_000_000.25, {"gateway": "g"})
    assert event.time == "2023-11-14T22:13:20.250Z"
    assert event.ts == 1_700_000_000.25
    assert len(event.id) == 28 and int(event.id, 16) >= 0
    assert event.id != make_event("gateway.drained", Severity.INFO, 0.0, {}).id


def test_encode_handles_values_json_lacks() -> None:
    issue = ConfigIssue("r.yaml", 3, "/routes/0", "bad")
    event = make_event(
        "config.rejected",
        Severity.ERROR,
        0.0,
        {"issues": (issue,), "trigger": "watch", "names": frozenset({"a"}), "path": Path("/x")},
    )
    fields = json.loads(encode(event))["fields"]
    assert fields == {
        "issues": [{"file": "r.yaml", "line": 3, "pointer": "/routes/0", "message": "bad"}],
        "trigger": "watch",
        "names": ["a"],
        "path": "/x",
    }


# -- the bus -------------------------------------------------------------------------------


async def test_sink_min_severity_filters() -> None:
    lines = await run_bus(
        [
            ("gateway.drained", Severity.INFO, {"gateway": "a"}),
            ("gateway.throttled", Severity.WARNING, {"gateway": "b", "retry_after_s": 1}),
            ("gateway.ejected", Severity.CRITICAL, dict(SAMPLES["gateway.ejected"])),
        ],
        min_severity=Severity.WARNING,
    )
    assert [e["kind"] for e in lines] == ["gateway.throttled", "gateway.ejected"]


async def test_bad_event_is_logged_once_and_still_delivered(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="proxy.events"):
        lines = await run_bus(
            [
                ("gateway.exploded", Severity.INFO, {"gateway": "a"}),
                ("gateway.exploded", Severity.INFO, {"gateway": "b"}),
                ("gateway.drained", Severity.INFO, {}),
                ("gateway.drained", Severity.INFO, {}),
            ]
        )
    assert len(lines) == 4
    messages = [r.getMessage() for r in caplog.records]
    assert messages == [
        "bad event: unknown event kind 'gateway.exploded'",
        "bad event: gateway.drained is missing gateway",
    ]


def test_emit_never_raises_even_when_a_sink_does(caplog: pytest.LogCaptureFixture) -> None:
    class Broken(QueuedSink):
        def offer(self, event: Event) -> bool:
            raise RuntimeError("boom")

    bus = EventBus([Broken(name="broken", min_severity=Severity.DEBUG, capacity=1)])
    with caplog.at_level(logging.ERROR, logger="proxy.events"):
        bus.emit("gateway.drained", Severity.INFO, gateway="a")
        bus.emit("gateway.drained", Severity.INFO, gateway="b")
    assert [r.getMessage() for r in caplog.records] == ["event emission failed"]


def test_full_queue_drops_and_counts_without_waiting() -> None:
    sink = StreamSink(io.BytesIO(), capacity=3)
    bus = EventBus([sink])
    for i in range(10):
        bus.emit("gateway.drained", Severity.INFO, gateway=f"g{i}")
    assert sink.dropped == 7
    assert bus.dropped == {"stdout": 7}


def test_sink_names_must_be_unique() -> None:
    with pytest.raises(ValueError, match="unique"):
        EventBus([StreamSink(io.BytesIO()), StreamSink(io.BytesIO())])


async def test_close_flushes_everything_queued() -> None:
    out = io.BytesIO()
    sink = StreamSink(out)
    bus = EventBus([sink])
    for i in range(1000):
        bus.emit("gateway.drained", Severity.INFO, gateway=f"g{i}")
    await bus.start()
    await bus.close(grace=5.0)
    gateways = [json.loads(line)["fields"]["gateway"] for line in out.getvalue().splitlines()]
    assert gateways == [f"g{i}" for i in range(1000)]
    assert sink.delivered == 1000
    assert sink.dropped == 0


async def test_emit_after_close_is_dropped() -> None:
    sink = StreamSink(io.BytesIO())
    bus = EventBus([sink])
    await bus.start()
    await bus.close(grace=1.0)
    bus.emit("gateway.drained", Severity.INFO, gateway="late")
    assert sink.dropped == 1


class _StuckStream(io.BytesIO):
    """A stdout whose reader went away: every write blocks until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()
        self.entered = threading.Event()

    def write(self, data: Any) -> int:
        self.entered.set()
        self.release.wait(10)
        return super().write(data)


async def test_stuck_stream_blocks_neither_emit_nor_close() -> None:
    stream = _StuckStream()
    sink = StreamSink(stream, capacity=10)
    bus = EventBus([sink])
    await bus.start()
    try:
        bus.emit("gateway.drained", Severity.INFO, gateway="first")
        assert await asyncio.to_thread(stream.entered.wait, 5)
        started = time.monotonic()
        for i in range(50):
            bus.emit("gateway.drained", Severity.INFO, gateway=f"g{i}")
        assert time.monotonic() - started < 0.5
        await bus.close(grace=0.1)
        assert time.monotonic() - started < 2.0
        # 1 stuck in the write, 10 queued, 40 refused by the full queue: all counted.
        assert sink.dropped == 51
    finally:
        stream.release.set()


async def test_failing_delivery_counts_and_writer_keeps_going() -> None:
    class Flaky(QueuedSink):
        def __init__(self) -> None:
            super().__init__(name="flaky", min_severity=Severity.DEBUG, capacity=10)
            self.got: list[str] = []
            self.failed = asyncio.Event()

        async def deliver(self, batch: Sequence[Event]) -> None:
            if any(e.fields["gateway"] == "bad" for e in batch):
                self.failed.set()
                raise OSError("disk full")
            self.got.extend(str(e.fields["gateway"]) for e in batch)

    sink = Flaky()
    bus = EventBus([sink])
    await bus.start()
    bus.emit("gateway.drained", Severity.INFO, gateway="bad")
    await sink.failed.wait()
    bus.emit("gateway.drained", Severity.INFO, gateway="good")
    await bus.close(grace=5.0)
    assert sink.got == ["good"]
    assert sink.dropped == 1


async def test_stream_sink_appends_to_a_file(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    path.write_bytes(b'{"earlier": true}\n')
    bus = EventBus([StreamSink(path, name="file")])
    await bus.start()
    bus.emit("gateway.drained", Severity.INFO, gateway="a")
    await bus.close()
    lines = path.read_bytes().splitlines()
    assert len(lines) == 2
    assert json.loads(lines[1])["fields"] == {"gateway": "a"}


async def started_file_sink(
    path: Path, linger: float, capacity: int = 10_000
) -> tuple[StreamSink, EventBus]:
    """A started sink writing `path` through a LineWriter, and its bus."""
    sink = StreamSink(path, name="file", capacity=capacity)
    sink.linger = linger
    bus = EventBus([sink])
    await bus.start()
    return sink, bus


async def test_stream_sink_batches_events_until_its_linger_or_a_flush(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    sink, bus = await started_file_sink(path, linger=60.0)
    bus.emit("gateway.drained", Severity.INFO, gateway="a")
    bus.emit("gateway.drained", Severity.INFO, gateway="b")
    await asyncio.sleep(0.1)
    assert not path.exists() or path.read_bytes() == b""  # waiting in its batch
    sink.flush()  # one hand-off for both, as the handler does between requests
    assert sink.delivered == 2
    bus.emit("gateway.drained", Severity.INFO, gateway="c")
    await bus.close()  # what waits is written before the file closes
    got = [json.loads(line)["fields"]["gateway"] for line in path.read_bytes().splitlines()]
    assert got == ["a", "b", "c"]
    assert sink.dropped == 0


async def test_stream_sink_hands_over_on_its_linger(tmp_path: Path) -> None:
    path = tmp_path / "events.jsonl"
    _, bus = await started_file_sink(path, linger=0.05)
    bus.emit("gateway.drained", Severity.INFO, gateway="a")
    await eventually(lambda: path.exists() and bool(path.read_bytes()), within=10.0)
    assert json.loads(path.read_bytes())["fields"] == {"gateway": "a"}
    await bus.close()


async def test_stream_sink_through_a_writer_drops_over_its_capacity(tmp_path: Path) -> None:
    sink, bus = await started_file_sink(tmp_path / "events.jsonl", linger=60.0, capacity=2)
    for gw in "abc":
        bus.emit("gateway.drained", Severity.INFO, gateway=gw)
    assert sink.dropped == 1
    await bus.close()
    assert sink.delivered == 2


async def test_stream_sink_drops_a_batch_it_cannot_encode_and_goes_on(tmp_path: Path) -> None:
    class Unprintable:
        def __str__(self) -> str:
            raise ValueError("no text")

    path = tmp_path / "events.jsonl"
    sink, bus = await started_file_sink(path, linger=60.0)
    sink.offer(make_event("gateway.drained", Severity.INFO, 0.0, {"gateway": Unprintable()}))
    sink.flush()
    assert sink.dropped == 1
    bus.emit("gateway.drained", Severity.INFO, gateway="a")
    await bus.close()
    assert [json.loads(x)["fields"] for x in path.read_bytes().splitlines()] == [{"gateway": "a"}]


async def test_stream_sink_defaults_to_stdout(capfdbinary: pytest.CaptureFixture[bytes]) -> None:
    bus = EventBus([StreamSink()])
    await bus.start()
    bus.emit("gateway.undrained", Severity.INFO, gateway="a")
    await bus.close()
    assert stdout_writer().flush(5)
    [line] = capfdbinary.readouterr().out.splitlines()
    assert json.loads(line)["kind"] == "gateway.undrained"


async def test_metrics_count_events_by_kind_and_drops_by_sink() -> None:
    registry = CollectorRegistry()
    sink = StreamSink(io.BytesIO(), capacity=1)
    bus = EventBus([sink], registry=registry)
    for _ in range(3):
        bus.emit("gateway.drained", Severity.INFO, gateway="a")
    bus.emit("gateway.undrained", Severity.INFO, gateway="a")

    def value(name: str, labels: dict[str, str]) -> float | None:
        return registry.get_sample_value(name, labels)

    assert value("payswitch_events_total", {"kind": "gateway.drained"}) == 3
    assert value("payswitch_events_total", {"kind": "gateway.undrained"}) == 1
    assert value("payswitch_events_dropped_total", {"sink": "stdout"}) == 3


def test_recording_emitter_fails_tests_on_a_bad_event() -> None:
    rec = RecordingEmitter()
    rec.emit("gateway.drained", Severity.INFO, gateway="a")
    assert rec.kinds() == ["gateway.drained"]
    with pytest.raises(AssertionError, match="missing gateway"):
        rec.emit("gateway.undrained", Severity.INFO)
    with pytest.raises(AssertionError, match="unknown event kind"):
        rec.emit("gateway.gone", Severity.INFO, gateway="a")


@pytest.mark.parametrize(
    "fields",
    [
        {"transaction_id": "t1", "status": 200, "duration_ms": 1.5, "gateway": None},
        {"reasons": {"g1": "ejected"}, "tried": ("g1", "g2"), "gateways": frozenset({"g1"})},
        {1: "a non-string key", "text": 'quote " and é'},
        {"obj": ConfigIssue(file="r.yaml", line=3, pointer="/routes/0", message="bad")},
    ],
    ids=["plain", "nested-and-tuples", "odd-keys-and-text", "object-as-text"],
)
def test_a_line_is_the_encoded_event_and_a_newline(fields: dict[Any, object]) -> None:
    for severity in Severity:
        event = make_event("transaction.pending", severity, 1_700_000_000.123, fields)
        assert encode_line(event) == encode(event) + b"\n"
        assert json.loads(encode_line(event))["severity"] == severity.name.lower()
