"""The in-memory stores: bounds, eviction order and TTLs on a manual clock.

The behaviours both idempotency stores share are in
tests/integration/test_store_conformance.py; this file covers what only memory has.
"""

from __future__ import annotations

import logging

import pytest

from proxy.clock import ManualClock
from proxy.idempotency.memory import ENTRY_OVERHEAD, MemoryIdempotencyStore
from proxy.idempotency.store import (
    Claimed,
    Completed,
    InFlight,
    StoredResponse,
    StoreFull,
    Unresolved,
    end_to_end_headers,
)
from proxy.idempotency.transactions import RECORD_OVERHEAD, MemoryTransactionStore

TTL = 3600.0


def response(body: bytes = b"ok", *, gateway: str = "stripe-eu") -> StoredResponse:
    return StoredResponse(
        status=201, headers=(), body=body, gateway=gateway, transaction_id="txn-1"
    )


async def claimed(store: MemoryIdempotencyStore, key: str, fp: str = "fp") -> str:
    result = await store.claim(key, fp, TTL, lock_ttl=30)
    assert isinstance(result, Claimed), result
    return result.lease


async def complete(store: MemoryIdempotencyStore, key: str, body: bytes = b"ok") -> None:
    lease = await claimed(store, key)
    assert await store.complete(key, lease, response(body), TTL)


async def unknown(store: MemoryIdempotencyStore, key: str) -> None:
    lease = await claimed(store, key)
    assert await store.mark_unknown(key, lease, "adyen-eu", "att-1", TTL)


async def state_of(store: MemoryIdempotencyStore, key: str) -> str:
    """What a claim of `key` now sees, without leaving a fresh claim behind."""
    result = await store.claim(key, "fp", TTL, lock_ttl=30)
    if isinstance(result, Claimed):
        await store.release(key, result.lease)
        return "absent"
    if isinstance(result, Unresolved):
        await store.release(key, result.lease)
    return type(result).__name__


def budget(entries: int, body: bytes = b"ok") -> int:
    """A byte budget that holds exactly `entries` completed two-letter keys with `body`."""
    return entries * (ENTRY_OVERHEAD + len("c1") + len("fp") + len(body))


async def test_evict_mode_drops_oldest_completed_and_never_unresolved_or_in_flight() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock(), max_bytes=budget(4))
    await unknown(store, "u1")
    await complete(store, "c1")
    await complete(store, "c2")
    held = await claimed(store, "f1")

    await complete(store, "c3")  # fifth entry: c1 is the oldest completed
    assert len(store) == 4
    await complete(store, "c4")  # c2 goes next
    await complete(store, "c5")  # only c3, c4 remain completed: c3 goes
    assert [await state_of(store, k) for k in ("c1", "c2", "c3")] == ["absent"] * 3
    assert await state_of(store, "u1") == "Unresolved"
    assert isinstance(await store.claim("f1", "fp", TTL), InFlight)
    assert await store.complete("f1", held, response(), TTL)
    assert store.evictions["completed"] >= 3
    assert store.evictions["unresolved"] == 0


async def test_unresolved_keys_are_never_evicted_new_keys_are_refused_instead() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock(), max_bytes=budget(2))
    await unknown(store, "u1")
    await unknown(store, "u2")
    with pytest.raises(StoreFull) as refused:
        await store.claim("u3", "fp", TTL, lock_ttl=30)
    assert refused.value.retry_after >= 1
    assert "full" in str(refused.value)
    assert store.refusals == 1
    assert await state_of(store, "u1") == "Unresolved"
    assert await state_of(store, "u2") == "Unresolved"


async def test_refuse_mode_keeps_every_unexpired_completed_key() -> None:
    clock = ManualClock()
    store = MemoryIdempotencyStore(clock=clock, max_bytes=budget(2), when_full="refuse")
    await complete(store, "c1")
    await complete(store, "c2")
    with pytest.raises(StoreFull):
        await store.claim("c3", "fp", TTL, lock_ttl=30)
    assert isinstance(await store.claim("c1", "fp", TTL), Completed)
    assert store.evictions["completed"] == 0
    clock.advance(TTL)  # once they expire, there is room again
    assert isinstance(await store.claim("c3", "fp", TTL, lock_ttl=30), Claimed)


async def test_in_flight_claims_are_never_evicted_and_completions_always_stored() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock(), max_bytes=budget(2))
    leases = [await claimed(store, f"f{i}") for i in range(2)]
    with pytest.raises(StoreFull):
        await store.claim("f2", "fp", TTL, lock_ttl=30)
    assert store.count("inflight") == 2
    # A completion adds its response over the budget: the payment happened.
    assert await store.complete("f0", leases[0], response(b"x" * 1000), TTL)
    assert await store.complete("f1", leases[1], response(), TTL)
    assert await state_of(store, "f1") == "Completed"


async def test_evictions_are_counted_and_warned_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = ManualClock()
    store = MemoryIdempotencyStore(clock=clock, max_bytes=budget(2))
    with caplog.at_level(logging.WARNING):
        for i in range(10):
            await complete(store, f"k{i}")
    assert store.evictions["completed"] == 8
    assert caplog.text.count("idempotency store full") == 1
    assert "no longer replayed here" in caplog.text
    clock.advance(61)
    with caplog.at_level(logging.WARNING):
        await complete(store, "k10")
    assert caplog.text.count("idempotency store full") == 2
    assert "evicted 8 completed key" in caplog.text.splitlines()[-1]


async def test_replay_window_is_the_age_of_the_oldest_completed_key() -> None:
    clock = ManualClock()
    store = MemoryIdempotencyStore(clock=clock)
    assert store.replay_window() is None
    await complete(store, "c1")
    clock.advance(30)
    await complete(store, "c2")
    assert store.replay_window() == pytest.approx(30)


async def test_replaying_a_key_makes_it_recently_used() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock(), max_bytes=budget(2))
    await complete(store, "c1")
    await complete(store, "c2")
    assert isinstance(await store.claim("c1", "fp", TTL), Completed)
    await complete(store, "c3")
    assert await state_of(store, "c1") == "Completed"
    assert await state_of(store, "c2") == "absent"


async def test_bytes_are_accounted_exactly_and_given_back() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock())
    await complete(store, "c1", b"a" * 100)
    await unknown(store, "u1")
    held = await claimed(store, "f1")
    entry = ENTRY_OVERHEAD + 4
    assert store.stored_bytes == 100
    assert store.held_bytes == 3 * entry + 100
    assert await store.release("f1", held)
    takeover = await store.claim("u1", "fp", TTL)
    assert isinstance(takeover, Unresolved)
    assert await store.complete("u1", takeover.lease, response(b"b" * 10), TTL)
    assert store.held_bytes == 2 * entry + 110
    await store.close()
    assert store.held_bytes == 0


async def test_header_bytes_count_towards_the_budget() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock())
    lease = await claimed(store, "c1")
    stored = StoredResponse(
        status=200, headers=(("a", "bc"),), body=b"xyz", gateway="g", transaction_id="t"
    )
    assert await store.complete("c1", lease, stored, TTL)
    assert store.stored_bytes == 6


async def test_a_response_larger_than_the_budget_is_kept_and_said(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = MemoryIdempotencyStore(clock=ManualClock(), max_bytes=budget(2))
    await complete(store, "c1")
    with caplog.at_level(logging.WARNING):
        await complete(store, "big", b"b" * 5000)
    replay = await store.claim("big", "fp", TTL)
    assert isinstance(replay, Completed)
    assert replay.response.body == b"b" * 5000
    assert store.count("completed") == 1  # c1 made room for it
    assert "over half the whole store budget" in caplog.text
    await complete(store, "c2")  # the next completion pushes it out
    assert await state_of(store, "big") == "absent"
    assert store.stored_bytes == 2


async def test_expired_entries_are_purged_and_give_back_their_bytes() -> None:
    clock = ManualClock()
    store = MemoryIdempotencyStore(clock=clock)
    for i in range(10):
        await complete(store, f"c{i}", b"x" * 10)
    assert store.stored_bytes == 100
    clock.advance(TTL)
    await store.claim("other", "fp", TTL)  # any claim sweeps what expired
    assert len(store) == 1
    assert store.stored_bytes == 0


async def test_re_armed_keys_survive_the_sweep_of_their_old_expiry() -> None:
    clock = ManualClock()
    store = MemoryIdempotencyStore(clock=clock)
    await unknown(store, "u1")
    clock.advance(TTL - 1)
    takeover = await store.claim("u1", "fp", TTL, lock_ttl=30)  # re-arms the key's TTL
    assert isinstance(takeover, Unresolved)
    assert await store.release("u1", takeover.lease)
    clock.advance(2)  # past the first expiry, well within the re-armed one
    await store.claim("other", "fp", TTL)
    assert await state_of(store, "u1") == "Unresolved"


async def test_the_expiry_heap_stays_proportional_to_the_entries() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock(), max_bytes=budget(10))
    for i in range(3000):
        await complete(store, f"c{i}")
    assert 8 <= len(store) <= 10  # longer keys cost a few bytes more
    assert len(store._expiry) <= 2 * len(store) + 1024 + 1


async def test_lock_ttl_defaults_to_the_store_setting() -> None:
    clock = ManualClock()
    store = MemoryIdempotencyStore(clock=clock, default_lock_ttl=5)
    assert isinstance(await store.claim("k", "fp", TTL), Claimed)
    busy = await store.claim("k", "fp", TTL)
    assert isinstance(busy, InFlight)
    assert busy.retry_after == pytest.approx(5)
    clock.advance(5)
    assert isinstance(await store.claim("k", "fp", TTL), Unresolved)


async def test_a_short_key_ttl_never_cuts_a_claim_short() -> None:
    clock = ManualClock()
    store = MemoryIdempotencyStore(clock=clock)
    assert isinstance(await store.claim("k", "fp", 1, lock_ttl=10), Claimed)
    clock.advance(5)
    assert isinstance(await store.claim("k", "fp", 1, lock_ttl=10), InFlight)


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf")], ids=str)
async def test_unusable_ttls_are_refused(ttl: float) -> None:
    store = MemoryIdempotencyStore(clock=ManualClock())
    with pytest.raises(ValueError, match="positive number of seconds"):
        await store.claim("k", "fp", ttl)
    with pytest.raises(ValueError, match="lock_ttl"):
        await store.claim("k", "fp", TTL, lock_ttl=ttl)
    assert len(store) == 0


@pytest.mark.parametrize(
    "kwargs",
    [{"max_bytes": 0}, {"when_full": "drop"}, {"default_lock_ttl": 0}],
    ids=["bytes", "when-full", "lock-ttl"],
)
def test_unusable_bounds_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        MemoryIdempotencyStore(**kwargs)  # type: ignore[arg-type]


async def test_close_forgets_everything() -> None:
    store = MemoryIdempotencyStore(clock=ManualClock())
    await complete(store, "c1")
    await store.close()
    assert len(store) == 0
    assert store.stored_bytes == 0


def test_stored_response_refuses_a_non_status() -> None:
    with pytest.raises(ValueError, match="not an HTTP status"):
        StoredResponse(status=42, headers=(), body=b"", gateway="g", transaction_id="t")


def test_end_to_end_headers_drop_hop_by_hop_and_connection_named_fields() -> None:
    headers = [
        ("Content-Type", "application/json"),
        ("Connection", "keep-alive, X-Trace-Hop"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("x-trace-hop", "1"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("Upgrade", "h2c"),
    ]
    assert end_to_end_headers(headers) == (
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    )


# -- the transaction log ------------------------------------------------------------------


async def test_transactions_round_trip_as_copies() -> None:
    store = MemoryTransactionStore(clock=ManualClock())
    record = {"transaction_id": "t1", "state": "PENDING", "attempts": [{"gateway": "g"}]}
    await store.put(record)
    got = await store.get("t1")
    assert got == record
    assert got is not None
    got["attempts"].append("tampered")
    assert await store.get("t1") == record
    record["state"] = "SUCCESS"
    assert (await store.get("t1") or {})["state"] == "PENDING"
    await store.put(record)
    assert (await store.get("t1") or {})["state"] == "SUCCESS"
    assert await store.get("t2") is None


async def test_transactions_expire_after_their_last_put() -> None:
    clock = ManualClock()
    store = MemoryTransactionStore(clock=clock, ttl=60)
    await store.put({"transaction_id": "t1"})
    clock.advance(50)
    await store.put({"transaction_id": "t2"})
    await store.put({"transaction_id": "t1", "state": "SUCCESS"})
    clock.advance(20)
    assert await store.get("t1") == {"transaction_id": "t1", "state": "SUCCESS"}
    assert await store.get("t2") is not None
    clock.advance(40)
    assert await store.get("t2") is None
    assert await store.get("t1") is None
    assert len(store) == 0


async def test_transactions_keep_only_the_newest_that_fit_the_byte_budget() -> None:
    one = RECORD_OVERHEAD + len("t0") + len('{"transaction_id":"t0"}')
    store = MemoryTransactionStore(clock=ManualClock(), max_bytes=3 * one)
    for i in range(5):
        await store.put({"transaction_id": f"t{i}"})
    await store.put({"transaction_id": "t4"})  # a rewrite replaces, never adds
    assert len(store) == 3
    assert store.held_bytes == 3 * one
    assert store.evictions == 2
    assert [await store.get(f"t{i}") is not None for i in range(5)] == [
        False,
        False,
        True,
        True,
        True,
    ]


@pytest.mark.parametrize(
    ("record", "error"),
    [
        ({}, ValueError),
        ({"transaction_id": ""}, ValueError),
        ({"transaction_id": 7}, ValueError),
        ({"transaction_id": "t", "raw": b"bytes"}, TypeError),
    ],
    ids=["no-id", "empty-id", "int-id", "bytes"],
)
async def test_transactions_refuse_records_that_are_not_json_objects_with_an_id(
    record: dict[str, object], error: type[Exception]
) -> None:
    store = MemoryTransactionStore(clock=ManualClock())
    with pytest.raises(error):
        await store.put(record)
    assert len(store) == 0
