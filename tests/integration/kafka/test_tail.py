"""`payswitch tail` as a user runs it, against records on the real broker."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaProducer

from proxy.kafka.topics import ensure_topics
from tests.kafka_support import kafka_settings, start_broker

pytestmark = pytest.mark.kafka


def event(kind: str, severity: str, **fields: object) -> bytes:
    return orjson.dumps(
        {"kind": kind, "severity": severity, "time": "2026-11-30T21:00:00.000Z", "ts": 1.0,
         "id": "0" * 28, "fields": fields}
    )  # fmt: skip


async def test_tail_follows_both_topics_with_filters(tmp_path: Path) -> None:
    start_broker()
    s = kafka_settings(tmp_path)
    await ensure_topics(s)
    producer = AIOKafkaProducer(bootstrap_servers=list(s.bootstrap))
    await producer.start()
    try:
        for topic, value in [
            (s.transactions_topic, event("transaction.succeeded", "info", transaction_id="t1",
                                         route="deposits", gateway="g1", status=200)),
            (s.transactions_topic, event("transaction.failed", "info", transaction_id="t2",
                                         route="deposits", gateway="g2", status=502)),
            (s.events_topic, event("gateway.ejected", "critical", gateway="g2",
                                   source="outlier", reason="5 failures", duration_s=30)),
            (s.events_topic, b"not json"),
        ]:  # fmt: skip
            await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()

    async def tail(*args: str) -> list[str]:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy", "tail", "--kafka-bootstrap", s.bootstrap[0],
            "--kafka-transactions-topic", s.transactions_topic,
            "--kafka-events-topic", s.events_topic, "--from-beginning", *args,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 30)
        assert proc.returncode == 0, err.decode()
        return out.decode().splitlines()

    by_gateway = await tail("--gateway", "g2", "--max", "2")
    assert sorted(line.split()[2] for line in by_gateway) == [
        "gateway.ejected",
        "transaction.failed",
    ]
    [critical] = await tail("--severity", "critical", "--max", "1")
    assert "gateway=g2" in critical and 'reason="5 failures"' in critical
    [one] = await tail("--transaction", "t1", "--max", "1", "--json")
    assert orjson.loads(one)["fields"]["status"] == 200


async def test_tail_without_a_broker_says_how_to_give_one() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "tail",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        env={"PATH": "/usr/bin:/bin"},
    )  # fmt: skip
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2
    assert b"--kafka-bootstrap" in err
