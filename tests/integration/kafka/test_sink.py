"""The Kafka sink against the real broker: every payment's story on payswitch.transactions."""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from proxy.tracing import Tracing
from tests.kafka_support import KEYED_RULES as RULES
from tests.kafka_support import kafka_settings, read_topic, start_broker
from tests.support import gateways, running_proxy

pytestmark = pytest.mark.kafka

TERMINAL = {"transaction.succeeded", "transaction.failed", "transaction.unknown"}


@pytest.fixture(scope="module", autouse=True)
def broker() -> None:
    start_broker()


async def test_a_thousand_payments_give_one_terminal_record_each_in_order(tmp_path: Path) -> None:
    kafka = kafka_settings(tmp_path)
    async with gateways("g1", "g2") as g:
        rules = RULES.format(g1=g["g1"].url, g2=g["g2"].url)
        async with running_proxy(rules, tmp_path, kafka=kafka) as p:
            sem = asyncio.Semaphore(50)

            async def pay(i: int) -> int:
                async with sem:
                    status, _, _ = await p.post(
                        headers={"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
                    )
                    return status

            statuses = await asyncio.gather(*(pay(i) for i in range(1000)))
            assert statuses.count(200) == 1000
            txn_ids = {e.fields["transaction_id"] for e in p.events.of("transaction.pending")}
            assert len(txn_ids) == 1000
    # The runtime is closed: the sink flushed on the way out.
    records = await read_topic(kafka, kafka.transactions_topic, expect=2000, within=20)
    by_key: dict[str | None, list[str]] = defaultdict(list)
    for rec in records:
        assert rec.headers["kind"] == rec.value["kind"]
        assert rec.value["fields"]["transaction_id"] == rec.key  # type: ignore[index]
        by_key[rec.key].append(str(rec.value["kind"]))
    assert set(by_key) == txn_ids
    for kinds in by_key.values():
        # In order per key: pending first, then exactly one terminal record.
        assert kinds[0] == "transaction.pending"
        assert [k for k in kinds if k in TERMINAL] == ["transaction.succeeded"]
        assert len(kinds) == 2
    events = await read_topic(kafka, kafka.events_topic, expect=1, within=10)
    assert "config.loaded" in {str(e.value["kind"]) for e in events}


async def test_records_carry_the_trace_context_of_their_request(tmp_path: Path) -> None:
    trace_id = "4bf92f3577b34da6a3ce929d0e0e4736"
    kafka = kafka_settings(tmp_path)
    async with gateways("g1", "g2") as g:
        rules = RULES.format(g1=g["g1"].url, g2=g["g2"].url)
        async with running_proxy(rules, tmp_path, kafka=kafka) as p:
            assert p.rt.kafka is not None
            p.rt.tracing = Tracing([SimpleSpanProcessor(InMemorySpanExporter())])
            p.rt.kafka.sink.trace_context = True  # as Runtime sets it when tracing is on
            status, _, _ = await p.post(
                headers={
                    "traceparent": f"00-{trace_id}-00f067aa0ba902b7-01",
                    "Idempotency-Key": "k-traced",
                }
            )
            assert status == 200
            await p.rt.tracing.close()
    records = await read_topic(kafka, kafka.transactions_topic, expect=2, within=10)
    assert [r.value["kind"] for r in records] == ["transaction.pending", "transaction.succeeded"]
    for r in records:
        assert r.headers["traceparent"].split("-")[1] == trace_id
