"""Metrics around any idempotency store: operations, errors, latency, evictions, keys held.

Owns: `MeteredIdempotencyStore`, a pass-through `IdempotencyStore` that counts every call
by operation and result (ok; refused: the memory store was full; error: the store failed)
with its latency, and reads the wrapped store's evictions by state, refusals, keys held
and bytes held (when it keeps them: the memory store) at scrape time. Whether the store is
up is proxy.idempotency.guard's.
Must not: change any result or swallow any error; nor cost the request path more than two
clock reads and two dict updates per call.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Awaitable, Iterable
from typing import TypeVar

from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from proxy.idempotency.store import ClaimResult, IdempotencyStore, StoredResponse, StoreFull

T = TypeVar("T")

#: Seconds; a store call is a hash lookup in memory or one Redis round trip.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
OPERATIONS = ("claim", "record_attempt", "complete", "mark_unknown", "release", "ping")
_STATES = ("inflight", "completed", "unresolved")


class _Op:
    __slots__ = ("buckets", "errors", "ok", "refused", "sum")

    def __init__(self) -> None:
        self.ok = 0
        self.refused = 0
        self.errors = 0
        self.sum = 0.0
        self.buckets = [0] * (len(BUCKETS) + 1)


class MeteredIdempotencyStore:
    """An `IdempotencyStore` that measures the one it wraps."""

    def __init__(self, inner: IdempotencyStore, registry: CollectorRegistry | None) -> None:
        self.inner = inner
        self._ops = {name: _Op() for name in OPERATIONS}
        if registry is not None:
            registry.register(_StoreCollector(self))

    async def _timed(self, op: str, call: Awaitable[T]) -> T:
        stats = self._ops[op]
        started = time.perf_counter()
        try:
            result = await call
        except StoreFull:
            stats.refused += 1
            raise
        except BaseException:
            stats.errors += 1
            raise
        finally:
            seconds = time.perf_counter() - started
            stats.sum += seconds
            stats.buckets[bisect_left(BUCKETS, seconds)] += 1
        stats.ok += 1
        return result

    async def claim(
        self, key: str, fingerprint: str, ttl: float, *, lock_ttl: float | None = None
    ) -> ClaimResult:
        return await self._timed(
            "claim", self.inner.claim(key, fingerprint, ttl, lock_ttl=lock_ttl)
        )

    async def record_attempt(
        self,
        key: str,
        lease: str,
        *,
        gateway: str,
        attempt_id: str,
        transaction_id: str | None = None,
    ) -> bool:
        return await self._timed(
            "record_attempt",
            self.inner.record_attempt(
                key, lease, gateway=gateway, attempt_id=attempt_id, transaction_id=transaction_id
            ),
        )

    async def complete(self, key: str, lease: str, response: StoredResponse, ttl: float) -> bool:
        return await self._timed("complete", self.inner.complete(key, lease, response, ttl))

    async def mark_unknown(
        self,
        key: str,
        lease: str,
        gateway: str,
        attempt_id: str,
        ttl: float,
        *,
        transaction_id: str | None = None,
    ) -> bool:
        return await self._timed(
            "mark_unknown",
            self.inner.mark_unknown(
                key, lease, gateway, attempt_id, ttl, transaction_id=transaction_id
            ),
        )

    async def release(self, key: str, lease: str) -> bool:
        return await self._timed("release", self.inner.release(key, lease))

    async def ping(self) -> None:
        await self._timed("ping", self.inner.ping())

    async def close(self) -> None:
        await self.inner.close()


class _StoreCollector(Collector):
    def __init__(self, store: MeteredIdempotencyStore) -> None:
        self._store = store

    def collect(self) -> Iterable[Metric]:
        ops = CounterMetricFamily(
            "payswitch_idempotency_store_operations",
            "Idempotency-store calls, by operation and result (ok; refused: the in-memory store "
            "was full; error: the store failed).",
            labels=("operation", "result"),
        )
        latency = HistogramMetricFamily(
            "payswitch_idempotency_store_operation_duration_seconds",
            "Time of one idempotency-store call, errors included.",
            labels=("operation",),
        )
        for name, op in self._store._ops.items():
            ops.add_metric([name, "ok"], float(op.ok))
            ops.add_metric([name, "refused"], float(op.refused))
            ops.add_metric([name, "error"], float(op.errors))
            running = 0
            buckets: list[tuple[str, float]] = []
            for le, n in zip((*map(repr, BUCKETS), "+Inf"), op.buckets, strict=True):
                running += n
                buckets.append((le, float(running)))
            latency.add_metric([name], buckets, sum_value=op.sum)
        yield ops
        yield latency
        inner = self._store.inner
        evictions = getattr(inner, "evictions", None)
        if isinstance(evictions, dict):
            evicted = CounterMetricFamily(
                "payswitch_idempotency_store_evictions",
                "Keys the in-memory store forgot before their TTL to stay within its bytes, "
                "by state (completed: a retry is no longer replayed).",
                labels=("state",),
            )
            for state, n in evictions.items():
                evicted.add_metric([str(state)], float(n))
            yield evicted
        refusals = getattr(inner, "refusals", None)
        if isinstance(refusals, int):
            yield CounterMetricFamily(
                "payswitch_idempotency_store_full_refusals",
                "New keys the in-memory store refused because it was full of unexpired keys.",
                value=float(refusals),
            )
        count = getattr(inner, "count", None)
        if callable(count):
            keys = GaugeMetricFamily(
                "payswitch_idempotency_store_keys",
                "Keys the in-memory store holds now, by state.",
                labels=("state",),
            )
            for state in _STATES:
                keys.add_metric([state], float(count(state)))
            yield keys
        held = getattr(inner, "held_bytes", None)
        if isinstance(held, int):
            yield GaugeMetricFamily(
                "payswitch_idempotency_store_bytes",
                "Bytes the in-memory store charges its entries now, against its budget.",
                value=float(held),
            )
