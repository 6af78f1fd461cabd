"""Sending records as whole batches, one per partition.

Owns: `send_records`: records grouped into one batch per topic partition (chosen as Java's
default partitioner does for a keyed record, murmur2 of the key, so other clients agree on
where a key lives) and handed to aiokafka's `send_batch`. Per record this costs about a
third of `send()`, which builds and routes each record on its own, and the sink runs on
the proxy's event loop, so this is the bill the payments pay.
Must not: retry or decide what a failure means; it reports which records failed.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.partitioner import murmur2

from proxy.kafka.records import Record


def partition_of(key: bytes | None, partitions: list[int]) -> int:
    if key is None:
        return partitions[0]
    index: int = (murmur2(key) & 0x7FFFFFFF) % len(partitions)
    return partitions[index]


async def send_records(producer: AIOKafkaProducer, records: list[Record]) -> list[int]:
    """Send `records`; the indexes of those the broker did not acknowledge. Raises only
    what waiting for metadata or batch room raises (the caller bounds it in time)."""
    known: dict[str, list[int]] = {}
    open_batches: dict[tuple[str, int], tuple[Any, list[int]]] = {}
    sent: list[tuple[asyncio.Future[Any], list[int]]] = []

    async def flush(where: tuple[str, int]) -> None:
        builder, indexes = open_batches.pop(where)
        sent.append((await producer.send_batch(builder, where[0], partition=where[1]), indexes))

    for i, rec in enumerate(records):
        headers = list(rec.headers)
        parts = known.get(rec.topic)
        if parts is None:
            parts = known[rec.topic] = sorted(await producer.partitions_for(rec.topic))
        where = (rec.topic, partition_of(rec.key, parts))
        entry = open_batches.get(where)
        if entry is None:
            entry = open_batches[where] = (producer.create_batch(), [])
        if entry[0].append(key=rec.key, value=rec.value, timestamp=None, headers=headers) is None:
            await flush(where)  # full: send it, start another
            entry = open_batches[where] = (producer.create_batch(), [])
            entry[0].append(key=rec.key, value=rec.value, timestamp=None, headers=headers)
        entry[1].append(i)
    for where in list(open_batches):
        await flush(where)
    results = await asyncio.gather(*(fut for fut, _ in sent), return_exceptions=True)
    return sorted(
        i
        for (_, indexes), result in zip(sent, results, strict=True)
        if isinstance(result, BaseException)
        for i in indexes
    )
