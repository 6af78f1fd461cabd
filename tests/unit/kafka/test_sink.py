"""The sink's buffer, drop and spill rules with the broker away: the bootstrap address is a
closed port on loopback, so every connection attempt is really refused."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.events import Event, Severity, make_event
from proxy.kafka.config import KafkaSettings
from proxy.kafka.sink import KafkaSink
from proxy.kafka.spill import SpillFile
from tests.support import eventually


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sink(tmp_path: Path, buffer: int = 3, registry: CollectorRegistry | None = None) -> KafkaSink:
    s = KafkaSink(
        KafkaSettings(
            bootstrap=(f"127.0.0.1:{closed_port()}",),
            buffer=buffer,
            spill_path=str(tmp_path / "spill.jsonl"),
        ),
        registry=registry,
    )
    s.send_timeout = 0.5
    return s


def ev(i: int, severity: Severity = Severity.INFO) -> Event:
    return make_event("gateway.ejected", severity, 1_700_000_000.0 + i, {"gateway": f"g{i}"})


def test_past_the_buffer_low_severity_is_dropped_and_counted(tmp_path: Path) -> None:
    s = sink(tmp_path)
    assert [s.offer(ev(i)) for i in range(5)] == [True, True, True, False, False]
    assert s.drops == {"buffer_full": 2}
    assert s.dropped == 2
    assert s.queued == 3


async def test_past_the_buffer_critical_records_spill_in_order(tmp_path: Path) -> None:
    registry = CollectorRegistry()
    s = sink(tmp_path, registry=registry)
    await s.start()
    try:
        for i in range(3):
            s.offer(ev(i))
        for i in range(3, 6):
            assert s.offer(ev(i, Severity.CRITICAL))
        # Room again in the buffer, but older critical records wait in the file: in order.
        s._pending.clear()
        assert s.offer(ev(6, Severity.CRITICAL))
        assert s.offer(ev(7))
        await eventually(lambda: s.spilled == 4, within=5)
        assert s.dropped == 0
        records, _ = SpillFile(tmp_path / "spill.jsonl", 1 << 20).read(10)
        assert [r.key for r in records] == [b"g3", b"g4", b"g5", b"g6"]
        assert registry.get_sample_value("payswitch_kafka_records_spilled_total") == 4
        assert registry.get_sample_value("payswitch_kafka_connected") == 0
        assert registry.get_sample_value("payswitch_kafka_spill_bytes") == s.spill.pending_bytes
    finally:
        await s.close(0.1)


async def test_closing_spills_critical_records_still_queued(tmp_path: Path) -> None:
    s = sink(tmp_path, buffer=10)
    await s.start()
    s.offer(ev(0))
    s.offer(ev(1, Severity.CRITICAL))
    await s.close(0.2)
    assert s.drops == {"closed": 1}
    assert s.spilled == 1
    assert not s.offer(ev(2, Severity.CRITICAL))
    assert s.drops["closed"] == 2


async def test_the_spill_file_is_bounded(tmp_path: Path) -> None:
    s = KafkaSink(
        KafkaSettings(
            bootstrap=(f"127.0.0.1:{closed_port()}",),
            buffer=1,
            spill_path=str(tmp_path / "spill.jsonl"),
            spill_max_bytes=600,
        )
    )
    await s.start()
    try:
        for i in range(10):
            s.offer(ev(i, Severity.CRITICAL))
            await asyncio.sleep(0)
        await eventually(lambda: s.spilled + s.drops.get("spill_full", 0) == 9, within=5)
        assert 0 < s.spilled < 9
        assert s.spill.pending_bytes <= 600
    finally:
        await s.close(0.1)


@pytest.mark.parametrize(
    ("min_severity", "expected"),
    [("info", Severity.INFO), ("critical", Severity.CRITICAL)],
    ids=["info", "critical"],
)
def test_min_severity(tmp_path: Path, min_severity: str, expected: Severity) -> None:
    s = KafkaSink(
        KafkaSettings(
            bootstrap=("127.0.0.1:1",),
            min_severity=min_severity,
            spill_path=str(tmp_path / "s"),
        )
    )
    assert s.min_severity is expected


async def test_a_record_the_broker_would_refuse_is_dropped_not_retried(tmp_path: Path) -> None:
    s = sink(tmp_path, buffer=1)
    await s.start()
    try:
        s.offer(ev(0))
        huge = make_event(
            "gateway.ejected", Severity.CRITICAL, 1.0, {"gateway": "g", "reason": "x" * (1 << 20)}
        )
        assert s.offer(huge)
        assert s.offer(ev(1, Severity.CRITICAL))
        await eventually(lambda: s.drops.get("too_large") == 1 and s.spilled == 1, within=5)
    finally:
        await s.close(0.1)
