"""The control-topic consumer: every replica reads all of `payswitch.control`.

Owns: `ControlConsumer`: assigns itself every partition of the topic (no consumer group, so
no replica shares or skips a command), seeks to the beginning, reads up to the end offsets
it found on start and applies the current record per key, then applies records as they
arrive; and the timer that expires commands on time. Reconnects with backoff when the
broker goes away; re-reading the topic is harmless (the overlay ignores a command it has).
Must not: decide what a command means (proxy.kafka.overlay) or block anything else: the
proxy serves on its rules while the topic is unreachable.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.aio import cancel_and_wait, spawn
from proxy.kafka.config import KafkaSettings
from proxy.kafka.overlay import Overlay
from proxy.kafka.topics import ensure_topics

logger = logging.getLogger(__name__)


class ControlConsumer:
    backoff = (0.2, 5.0)

    def __init__(
        self, settings: KafkaSettings, overlay: Overlay, registry: CollectorRegistry | None = None
    ) -> None:
        self.settings = settings
        self.overlay = overlay
        if registry is not None:
            registry.register(_ControlCollector(self))
        self.caught_up = asyncio.Event()  # set once the topic's commands on start are applied
        self._changed = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        overlay.on_change = self._changed.set

    async def start(self) -> None:
        if not self._tasks:
            self._tasks = [
                spawn(self._run(), name="kafka.control.consumer"),
                spawn(self._expire_loop(), name="kafka.control.expiry"),
            ]

    async def close(self) -> None:
        await cancel_and_wait(*self._tasks)
        self._tasks = []

    async def _run(self) -> None:
        delay = self.backoff[0]
        warned = False
        while True:
            consumer = AIOKafkaConsumer(
                **self.settings.connection(),
                group_id=None,
                enable_auto_commit=False,
                auto_offset_reset="earliest",
                fetch_max_wait_ms=100,
                request_timeout_ms=10_000,
            )
            try:
                await self._consume(consumer)
            except (KafkaError, OSError, TimeoutError) as exc:
                if not warned:
                    logger.warning("control: topic unreachable (%s); retrying", exc)
                    warned = True
            finally:
                with contextlib.suppress(Exception):
                    await consumer.stop()
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff[1])

    async def _consume(self, consumer: AIOKafkaConsumer) -> None:
        topic = self.settings.control_topic
        async with asyncio.timeout(15):
            await consumer.start()
            if self.settings.create_topics:
                await ensure_topics(self.settings)
            tps = await assign_all(consumer, topic)
        end = await consumer.end_offsets(tps)
        latest: dict[bytes | None, bytes | None] = {}
        while await _behind(consumer, tps, end):
            batch = await consumer.getmany(*tps, timeout_ms=500)
            for records in batch.values():
                for rec in records:
                    latest[rec.key] = rec.value
        self.overlay.load(latest)
        logger.info("control: %d command record(s) read from %s", len(latest), topic)
        self.caught_up.set()
        while True:
            batch = await consumer.getmany(*tps, timeout_ms=1000)
            for records in batch.values():
                for rec in records:
                    self.overlay.apply_record(rec.key, rec.value)

    async def _expire_loop(self) -> None:
        clock = self.overlay.clock
        while True:
            self._changed.clear()
            nxt = self.overlay.expire()
            wait = 3600.0 if nxt is None else max(0.0, nxt - clock.wall())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(min(wait, 1.0) if wait > 0 else 0.001):
                    await self._changed.wait()


async def _behind(
    consumer: AIOKafkaConsumer, tps: list[TopicPartition], end: dict[TopicPartition, int]
) -> bool:
    for tp in tps:
        if await consumer.position(tp) < end[tp]:
            return True
    return False


async def assign_all(consumer: AIOKafkaConsumer, topic: str) -> list[TopicPartition]:
    """Every partition of `topic`, read from its beginning. Without a group id the client
    hands a subscriber every partition; what it fetched meanwhile is read again."""
    consumer.subscribe(topics=[topic])
    while not consumer.assignment():
        await consumer.getmany(timeout_ms=100)
    tps = sorted(consumer.assignment(), key=lambda tp: tp.partition)
    await consumer.seek_to_beginning(*tps)
    return tps


class _ControlCollector(Collector):
    def __init__(self, consumer: ControlConsumer) -> None:
        self._consumer = consumer

    def collect(self) -> Iterable[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "payswitch_control_caught_up",
            "1 once the control topic's commands present on start have been applied.",
            value=float(self._consumer.caught_up.is_set()),
        )
        yield GaugeMetricFamily(
            "payswitch_control_commands",
            "Control commands in force.",
            value=float(len(self._consumer.overlay.current)),
        )
