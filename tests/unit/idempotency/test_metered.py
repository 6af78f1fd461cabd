"""The metered store: every call counted with its result and latency, nothing changed."""

from __future__ import annotations

import socket

import pytest
from prometheus_client import CollectorRegistry
from redis.exceptions import ConnectionError as RedisConnectionError

from proxy.clock import ManualClock
from proxy.idempotency import (
    Claimed,
    Completed,
    MemoryIdempotencyStore,
    StoredResponse,
)
from proxy.idempotency.memory import ENTRY_OVERHEAD
from proxy.idempotency.metered import MeteredIdempotencyStore
from proxy.idempotency.redis_store import RedisIdempotencyStore
from proxy.idempotency.store import StoreFull


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def response(body: bytes = b"{}") -> StoredResponse:
    return StoredResponse(status=200, headers=(), body=body, gateway="g1", transaction_id="t1")


async def test_calls_pass_through_and_are_counted_with_latency() -> None:
    registry = CollectorRegistry()
    store = MeteredIdempotencyStore(MemoryIdempotencyStore(clock=ManualClock()), registry)
    claim = await store.claim("k1", "fp", 60.0)
    assert isinstance(claim, Claimed)
    assert await store.record_attempt("k1", claim.lease, gateway="g1", attempt_id="a1")
    assert await store.complete("k1", claim.lease, response(), 60.0)
    again = await store.claim("k1", "fp", 60.0)
    assert isinstance(again, Completed)
    ops = "payswitch_idempotency_store_operations_total"
    assert value(registry, ops, operation="claim", result="ok") == 2
    assert value(registry, ops, operation="complete", result="ok") == 1
    assert value(registry, ops, operation="release", result="ok") == 0
    assert value(registry, ops, operation="claim", result="error") == 0
    hist = "payswitch_idempotency_store_operation_duration_seconds"
    assert value(registry, f"{hist}_count", operation="claim") == 2
    assert value(registry, f"{hist}_bucket", operation="claim", le="+Inf") == 2
    assert value(registry, "payswitch_idempotency_store_keys", state="completed") == 1
    assert value(registry, "payswitch_idempotency_store_keys", state="inflight") == 0


async def test_evictions_by_state_and_bytes_held_are_counted() -> None:
    registry = CollectorRegistry()
    inner = MemoryIdempotencyStore(clock=ManualClock(), max_bytes=ENTRY_OVERHEAD * 8)
    store = MeteredIdempotencyStore(inner, registry)
    for i in range(40):
        claim = await store.claim(f"k{i}", "fp", 60.0)
        assert isinstance(claim, Claimed)
        await store.complete(f"k{i}", claim.lease, response(), 60.0)
    evicted = value(registry, "payswitch_idempotency_store_evictions_total", state="completed")
    held = value(registry, "payswitch_idempotency_store_keys", state="completed")
    assert evicted is not None and held is not None
    assert evicted > 0 and evicted + held == 40
    assert value(registry, "payswitch_idempotency_store_bytes") == inner.held_bytes


async def test_a_full_store_that_refuses_counts_refusals_not_errors() -> None:
    registry = CollectorRegistry()
    inner = MemoryIdempotencyStore(
        clock=ManualClock(), max_bytes=ENTRY_OVERHEAD * 4, when_full="refuse"
    )
    store = MeteredIdempotencyStore(inner, registry)
    refused = 0
    for i in range(20):
        try:
            await store.claim(f"k{i}", "fp", 60.0)
        except StoreFull:
            refused += 1
    assert refused > 0
    ops = "payswitch_idempotency_store_operations_total"
    assert value(registry, ops, operation="claim", result="refused") == refused
    assert value(registry, ops, operation="claim", result="error") == 0
    assert value(registry, "payswitch_idempotency_store_full_refusals_total") == refused


async def test_a_failing_store_counts_errors_and_raises_them_unchanged() -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        port = closed.getsockname()[1]
        registry = CollectorRegistry()
        inner = RedisIdempotencyStore.from_url(f"redis://127.0.0.1:{port}/0", "test:")
        store = MeteredIdempotencyStore(inner, registry)
        try:
            with pytest.raises(RedisConnectionError):
                await store.claim("k1", "fp", 60.0)
        finally:
            await store.close()
    ops = "payswitch_idempotency_store_operations_total"
    assert value(registry, ops, operation="claim", result="error") == 1
    assert value(registry, ops, operation="claim", result="ok") == 0
    # A Redis store keeps no local keys: no eviction or key-count families are made up.
    assert value(registry, "payswitch_idempotency_store_evictions_total") is None
