"""The Kafka event sink: transactions and gateway, config and payment-safety events out.

Owns: `KafkaSink`, a `Sink` for the EventBus. `offer` only appends to a bounded in-memory
buffer; one background writer turns events into records (proxy.kafka.records) and sends
them with an idempotent, acks=all, zstd-compressed producer. While the broker is away the
buffer fills; past its bound low-severity records are dropped and counted, and `critical`
records spill to a size-bounded local file (proxy.kafka.spill) that is sent, in order,
once the broker is back. A critical record arriving while older ones wait in the file goes
to the file too, so critical records keep their order. Metrics: queued, sent, dropped,
spilled, send latency.
Must not: make `offer` wait, do I/O or raise; nor lose a critical record it accepted
without counting it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.aio import cancel_and_wait, spawn
from proxy.events import Event, Severity
from proxy.kafka.config import KafkaSettings
from proxy.kafka.produce import Placed, send_records
from proxy.kafka.records import Record, record_of, traceparent_now
from proxy.kafka.spill import SpillFile
from proxy.kafka.topics import ensure_topics

logger = logging.getLogger(__name__)

T = TypeVar("T")
#: Larger records are dropped: the broker's default message.max.bytes is 1 MiB.
MAX_RECORD_BYTES = 900 * 1024
Pending = tuple[Event, str | None]  # the event and the trace context it was emitted in


class KafkaSink:
    batch_max = 2000
    linger = 0.02  # seconds to gather records after the writer was idle
    spill_backlog = 10_000  # critical records waiting for the file writer, at most
    send_timeout = 5.0  # a batch not acknowledged by then is retried on a fresh producer
    backoff = (0.2, 2.0)  # reconnect delay: first, most

    def __init__(
        self, settings: KafkaSettings, *, registry: CollectorRegistry | None = None
    ) -> None:
        self.name = "kafka"
        self.settings = settings
        self.min_severity = Severity[settings.min_severity.upper()]
        self.capacity = settings.buffer
        self.spill = SpillFile(settings.spill_path, settings.spill_max_bytes)
        self.sent: dict[str, int] = {}
        self.drops: dict[str, int] = {}
        self.spilled = 0
        self.connected = False
        self.trace_context = True  # read the emitter's span for a traceparent header
        self._pending: deque[Pending] = deque()
        self._overflow: deque[Pending] = deque()  # critical past the buffer, for the file
        self._spilling = self.spill.pending_bytes > 0
        self._enqueued = 0  # records ever put in the buffer
        self._taken = 0  # records ever taken from it and not put back
        self._spill_after = 0  # the file's records go once this many were taken
        self._warned = False
        self._spill_lock = asyncio.Lock()
        self._spill_thread = ThreadPoolExecutor(1, thread_name_prefix="kafka-spill")
        self._producer: AIOKafkaProducer | None = None
        self._wakeup = asyncio.Event()  # the writer: records to send
        self._spill_wakeup = asyncio.Event()  # the spiller: critical records past the buffer
        self._closing = asyncio.Event()  # cuts the writer's reconnect back-off short
        self._idle = asyncio.Event()
        self._closed = False
        self._tasks: list[asyncio.Task[None]] = []
        self._placed: Placed = {}  # partition of recent keys, for send_records
        self._latency = Histogram(
            "payswitch_kafka_send_latency_seconds",
            "Time from handing a batch to the producer to the broker acknowledging it.",
            buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0),
            registry=registry,
        )
        if registry is not None:
            registry.register(_SinkCollector(self))

    # -- the emitting side: never waits ------------------------------------------------

    @property
    def dropped(self) -> int:
        return sum(self.drops.values())

    @property
    def queued(self) -> int:
        return len(self._pending) + len(self._overflow)

    def _drop(self, reason: str, count: int = 1) -> None:
        self.drops[reason] = self.drops.get(reason, 0) + count

    def offer(self, event: Event) -> bool:
        if self._closed:
            self._drop("closed")
            return False
        item = (event, traceparent_now() if self.trace_context else None)
        critical = event.severity >= Severity.CRITICAL
        if critical and self._spilling:
            return self._to_spill(item)
        if len(self._pending) < self.capacity:
            self._pending.append(item)
            self._enqueued += 1
            self._wakeup.set()
            return True
        if critical:
            self._spilling = True
            self._spill_after = self._enqueued
            return self._to_spill(item)
        self._drop("buffer_full")
        return False

    def _to_spill(self, item: Pending) -> bool:
        if len(self._overflow) >= self.spill_backlog:
            self._drop("spill_backlog_full")
            return False
        self._overflow.append(item)
        self._spill_wakeup.set()
        return True

    # -- lifecycle --------------------------------------------------------------------

    async def start(self) -> None:
        if not self._tasks and not self._closed:
            self._tasks = [
                spawn(self._run_writer(), name="kafka.sink.writer"),
                spawn(self._run_spiller(), name="kafka.sink.spiller"),
            ]

    async def close(self, grace: float) -> None:
        """Send what is queued within `grace`; critical records left spill to the file."""
        self._closed = True
        self._closing.set()
        self._wakeup.set()
        if self._tasks and (self._pending or self._overflow or self._spill_ready()):
            self._idle.clear()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(grace):
                    await self._idle.wait()
        await cancel_and_wait(*self._tasks)
        self._tasks = []
        left = [*self._pending, *self._overflow]
        self._pending.clear()
        self._overflow.clear()
        critical = [p for p in left if p[0].severity >= Severity.CRITICAL]
        self._drop("closed", len(left) - len(critical))
        if critical:
            await self._spill_items(critical)
        await self._stop_producer()
        self._spill_thread.shutdown(wait=False)

    # -- background: spilling ---------------------------------------------------------

    def _records(self, items: list[Pending]) -> tuple[list[Pending], list[Record]]:
        """Records for `items`, and the items they came from: a record the broker would
        refuse as too large is dropped and counted here, or it would block its partition's
        queue for ever."""
        s = self.settings
        records = [
            record_of(ev, tp, transactions_topic=s.transactions_topic, events_topic=s.events_topic)
            for ev, tp in items
        ]
        if all(len(r.value) <= MAX_RECORD_BYTES for r in records):
            return items, records
        keep = [i for i, r in enumerate(records) if len(r.value) <= MAX_RECORD_BYTES]
        logger.error(
            "kafka: %d event(s) over %d bytes dropped", len(records) - len(keep), MAX_RECORD_BYTES
        )
        self._drop("too_large", len(records) - len(keep))
        return [items[i] for i in keep], [records[i] for i in keep]

    async def _spill_io(self, fn: Callable[..., T], *args: object) -> T:
        """Run a spill file call on the one spill thread: calls never overlap, even when a
        cancelled caller left one running."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._spill_thread, fn, *args)

    async def _spill_items(self, items: list[Pending]) -> None:
        _, records = self._records(items)
        async with self._spill_lock:
            try:
                written = await self._spill_io(self.spill.append, records)
            except OSError as exc:
                logger.error("kafka: spilling %d critical record(s) failed: %s", len(records), exc)
                written = 0
        self.spilled += written
        if written < len(records):
            logger.error(
                "kafka: spill file full; %d critical record(s) lost", len(records) - written
            )
            self._drop("spill_full", len(records) - written)

    async def _run_spiller(self) -> None:
        while True:
            await _wait_for(self._spill_wakeup, lambda: bool(self._overflow))
            items = list(self._overflow)
            await self._spill_items(items)
            # Only now: cancelled mid-write, `close` spills them again (at least once).
            for _ in items:
                self._overflow.popleft()
            self._wakeup.set()  # the writer may send them now

    # -- background: sending ----------------------------------------------------------

    def _spill_ready(self) -> bool:
        """Spilled records may go once every record buffered before them has gone."""
        return self.spill.pending_bytes > 0 and self._taken >= self._spill_after

    async def _run_writer(self) -> None:
        delay = self.backoff[0]
        spill_turn = True
        while True:
            if not self._pending and not self._spill_ready():
                if not self._overflow and self.spill.pending_bytes == 0:
                    self._spilling = False
                self._idle.set()
                await _wait_for(self._wakeup, lambda: bool(self._pending) or self._spill_ready())
                # Gather a batch: one send per linger period under load, not one per event.
                await asyncio.sleep(self.linger)
                continue
            if self._producer is None and not await self._connect():
                await self._sleep(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            # Take turns, so a steady stream of new records cannot starve the file.
            if self._spill_ready() and (spill_turn or not self._pending):
                spill_turn = False
                await self._send_spilled()
            else:
                spill_turn = True
                await self._send_pending()

    async def _send_pending(self) -> None:
        n = min(len(self._pending), self.batch_max)
        items = [self._pending.popleft() for _ in range(n)]
        self._taken += n
        items, records = self._records(items)
        failed = await self._send(records)
        if failed:
            # Back at the front, oldest first: per-key order survives the retry.
            self._pending.extendleft(reversed([items[i] for i in failed]))
            self._taken -= len(failed)

    async def _send_spilled(self) -> None:
        async with self._spill_lock:
            records, pos = await self._spill_io(self.spill.read, self.batch_max)
        if records and await self._send(records):
            return  # nothing forgotten: the next read starts at the same place
        async with self._spill_lock:
            await self._spill_io(self.spill.commit, pos)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    async def _connect(self) -> bool:
        s = self.settings
        producer = AIOKafkaProducer(
            **s.connection(),
            acks="all",
            enable_idempotence=True,
            # zstd: a third of lz4's CPU here (aiokafka runs lz4 at level 9), half the bytes.
            compression_type="zstd",
            linger_ms=5,
            max_batch_size=256 * 1024,
            request_timeout_ms=int(self.send_timeout * 1000),
            retry_backoff_ms=100,
        )
        try:
            async with asyncio.timeout(self.send_timeout):
                await producer.start()
            if s.create_topics:
                await ensure_topics(s, request_timeout=self.send_timeout)
        except asyncio.CancelledError:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise
        except (KafkaError, OSError, TimeoutError) as exc:
            if not self._warned:
                logger.warning("kafka: broker unavailable (%s); buffering events", exc)
                self._warned = True
            self.connected = False
            with contextlib.suppress(Exception):
                await producer.stop()
            return False
        self._producer = producer
        if not self.connected:
            logger.info("kafka: connected to %s", ",".join(s.bootstrap))
        self.connected = True
        self._warned = False
        return True

    async def _stop_producer(self) -> None:
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            async with asyncio.timeout(self.send_timeout):
                await producer.stop()
        except Exception:
            # A flush stuck past the timeout must not keep the broker connections open:
            # close what stop() would have closed after it.
            with contextlib.suppress(Exception):
                await producer._sender.close()
            with contextlib.suppress(Exception):
                await producer.client.close()

    async def _send(self, records: list[Record]) -> list[int]:
        """Send `records`; returns the indexes of those not acknowledged (empty when all
        were). A failure retires the producer: a fresh one gets a fresh idempotence state."""
        producer = self._producer
        assert producer is not None
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.send_timeout):
                failed = await send_records(producer, records, self._placed)
        except (KafkaError, OSError, TimeoutError) as exc:
            logger.warning("kafka: send failed (%s); retrying", exc)
            failed = list(range(len(records)))
        self._latency.observe(time.monotonic() - started)
        lost = set(failed)
        sent = self.sent
        for i, rec in enumerate(records):
            if i not in lost:
                sent[rec.topic] = sent.get(rec.topic, 0) + 1
        if failed:
            self.connected = False
            await self._stop_producer()
        return failed


async def _wait_for(event: asyncio.Event, ready: Callable[[], bool]) -> None:
    while not ready():
        event.clear()
        if ready():
            return
        await event.wait()


class _SinkCollector(Collector):
    def __init__(self, sink: KafkaSink) -> None:
        self._sink = sink

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        s = self._sink
        yield GaugeMetricFamily(
            "payswitch_kafka_records_queued",
            "Records waiting in memory for the broker.",
            value=float(s.queued),
        )
        sent = CounterMetricFamily(
            "payswitch_kafka_records_sent", "Records the broker acknowledged.", labels=["topic"]
        )
        for topic, n in list(s.sent.items()):
            sent.add_metric([topic], float(n))
        yield sent
        dropped = CounterMetricFamily(
            "payswitch_kafka_records_dropped",
            "Records lost: buffer full (low severity), spill file full, closed.",
            labels=["reason"],
        )
        for reason, n in list(s.drops.items()):
            dropped.add_metric([reason], float(n))
        yield dropped
        yield CounterMetricFamily(
            "payswitch_kafka_records_spilled",
            "Critical records written to the spill file while the broker was away.",
            value=float(s.spilled),
        )
        yield GaugeMetricFamily(
            "payswitch_kafka_spill_bytes",
            "Bytes in the spill file not yet sent.",
            value=float(s.spill.pending_bytes),
        )
        yield GaugeMetricFamily(
            "payswitch_kafka_connected",
            "1 while the producer is connected.",
            value=float(s.connected),
        )
