"""Batches per partition against the real broker: every record lands, keys where Java's
partitioner would put them."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer

from proxy.kafka.produce import PLACED_MAX, Placed, murmur2, partition_of, send_records
from proxy.kafka.records import Record
from proxy.kafka.topics import ensure_topics
from tests.kafka_support import kafka_settings, read_topic, start_broker


@pytest.mark.parametrize(
    ("key", "expected"),
    # From kafka-clients 4.1.1: Utils.toPositive(Utils.murmur2(key)) % 3.
    [(b"gateway/g1", 0), (b"a", 1), (b"", 0), (None, 0)],
    ids=["gateway", "a", "empty", "no-key"],
)
def test_partition_of_matches_the_default_partitioner(key: bytes | None, expected: int) -> None:
    from aiokafka.partitioner import murmur2

    assert (
        partition_of(key, [0, 1, 2])
        == (0 if key is None else (murmur2(key) & 0x7FFFFFFF) % 3)
        == expected
    )


@pytest.mark.parametrize("length", [0, 1, 2, 3, 4, 5, 7, 8, 28, 29, 30, 31, 64, 255])
def test_murmur2_agrees_with_aiokafka(length: int) -> None:
    from aiokafka.partitioner import murmur2 as reference

    for seed in range(20):
        data = bytes((seed * 31 + i * 7 + i * i) & 0xFF for i in range(length))
        assert murmur2(data) == reference(data)


@pytest.mark.kafka
async def test_every_record_lands_in_order_per_key(tmp_path: Path) -> None:
    start_broker()
    s = kafka_settings(tmp_path)
    await ensure_topics(s)
    producer = AIOKafkaProducer(
        bootstrap_servers=list(s.bootstrap), acks="all", enable_idempotence=True,
        max_batch_size=16 * 1024,
    )  # fmt: skip
    await producer.start()
    keys = [uuid.uuid4().hex.encode() for _ in range(50)]
    records = [
        Record(
            topic=s.transactions_topic,
            key=keys[i % 50],
            value=b'{"n": %d, "pad": "%s"}' % (i, b"x" * 200),
            headers=(("kind", b"t"),),
            critical=False,
        )
        for i in range(2000)
    ]
    try:
        placed: Placed = {}  # shared across the two calls, as the sink shares it
        assert await send_records(producer, records[:1000], placed) == []
        assert await send_records(producer, records[1000:], placed) == []
        assert placed == {
            (s.transactions_topic, k, 3): partition_of(k, [0, 1, 2]) for k in set(keys)
        }
    finally:
        await producer.stop()
    got = await read_topic(s, s.transactions_topic, expect=2000, within=15)
    assert len(got) == 2000
    per_key: dict[str | None, list[int]] = {}
    for c in got:
        per_key.setdefault(c.key, []).append(int(str(c.value["n"])))
        assert c.partition == partition_of(c.key.encode() if c.key else None, [0, 1, 2])
    for ns in per_key.values():
        assert ns == sorted(ns)


@pytest.mark.kafka
async def test_the_placement_cache_starts_afresh_when_full(tmp_path: Path) -> None:
    start_broker()
    s = kafka_settings(tmp_path)
    await ensure_topics(s)
    producer = AIOKafkaProducer(bootstrap_servers=list(s.bootstrap), acks="all")
    await producer.start()
    placed: Placed = {("other", str(i).encode(), 1): 0 for i in range(PLACED_MAX)}
    rec = Record(topic=s.events_topic, key=b"k", value=b"{}", headers=(), critical=False)
    try:
        assert await send_records(producer, [rec], placed) == []
    finally:
        await producer.stop()
    assert list(placed) == [(s.events_topic, b"k", 3)]
