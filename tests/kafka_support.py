"""Test harness for the Kafka parts: the real broker (.ci/kafka/start), topics of their own
per test, and a reader that returns every record of a topic."""

from __future__ import annotations

import asyncio
import os
import subprocess
import uuid
from dataclasses import dataclass, replace
from pathlib import Path

import orjson
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from proxy.kafka.config import KafkaSettings
from proxy.kafka.control import assign_all

ROOT = Path(__file__).resolve().parents[1]
BROKER_PORT = 9092


def start_broker(port: int = BROKER_PORT, *, keep: bool = False) -> None:
    """Start the broker on `port` unless it answers; fail the test loudly if it cannot."""
    env = {**os.environ, "PAYSWITCH_KAFKA_PORT": str(port)}
    args = [str(ROOT / ".ci/kafka/start"), *(["--keep"] if keep else [])]
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        pytest.fail(f"the Kafka broker on 127.0.0.1:{port} did not start:\n{done.stderr}")


def stop_broker(port: int) -> None:
    env = {**os.environ, "PAYSWITCH_KAFKA_PORT": str(port)}
    subprocess.run([str(ROOT / ".ci/kafka/stop")], env=env, check=True, timeout=60)


def kafka_settings(tmp_path: Path, port: int = BROKER_PORT, **kw: object) -> KafkaSettings:
    """Settings with topics no other test uses, and a spill file in `tmp_path`."""
    tag = uuid.uuid4().hex[:10]
    base = KafkaSettings(
        bootstrap=(f"127.0.0.1:{port}",),
        transactions_topic=f"test.{tag}.transactions",
        events_topic=f"test.{tag}.events",
        control_topic=f"test.{tag}.control",
        spill_path=str(tmp_path / "spill.jsonl"),
    )
    return replace(base, **kw)  # type: ignore[arg-type]


@dataclass(frozen=True, slots=True)
class Consumed:
    partition: int
    offset: int
    key: str | None
    value: dict[str, object]
    headers: dict[str, str]


async def read_topic(
    settings: KafkaSettings, topic: str, *, expect: int, within: float
) -> list[Consumed]:
    """Every record of `topic` from the beginning, waiting up to `within` seconds for at
    least `expect` of them; in partition, then offset order."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=list(settings.bootstrap), group_id=None, enable_auto_commit=False
    )
    await consumer.start()
    try:
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        async with asyncio.timeout(within):
            tps = await assign_all(consumer, topic)
        out: list[Consumed] = []
        idle_until = None
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=300)
            for tp, records in batch.items():
                out.extend(
                    Consumed(
                        partition=tp.partition,
                        offset=r.offset,
                        key=r.key.decode() if r.key is not None else None,
                        value=orjson.loads(r.value),
                        headers={k: v.decode() for k, v in r.headers},
                    )
                    for r in records
                )
            now = loop.time()
            if len(out) >= expect:
                # Read a little longer: a duplicate would arrive after the ones expected.
                idle_until = idle_until or now + 0.5
                if now > idle_until:
                    break
            elif now > end:
                break
        return sorted(out, key=lambda c: (c.partition, c.offset))
    finally:
        await consumer.stop()


async def publish(
    settings: KafkaSettings, key: str, value: dict[str, object] | bytes | None
) -> None:
    producer = AIOKafkaProducer(bootstrap_servers=list(settings.bootstrap), acks="all")
    await producer.start()
    try:
        data = value if isinstance(value, bytes | None) else orjson.dumps(value)
        await producer.send_and_wait(settings.control_topic, data, key=key.encode())
    finally:
        await producer.stop()


#: Two gateways of one region behind one POST route: the rules every Kafka test runs on
#: (format with g1=, g2=; KEYED_RULES adds an idempotency key header).
RULES = """
gateways:
  g1: {{url: '{g1}', region: eu}}
  g2: {{url: '{g2}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [g1, g2]
"""
KEYED_RULES = RULES + "    idempotency: {{header: Idempotency-Key}}\n"
