"""One table of idempotency behaviours, run against the memory store and real Redis alike.

Each scenario is written once against `IdempotencyStore`; the `harness` fixture supplies a
store and a way to let time pass (a ManualClock for memory, real sleeps past short PX
expiries for Redis). Redis must be up on 127.0.0.1:6379: these tests fail, not skip,
without it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.clock import ManualClock
from proxy.idempotency.memory import MemoryIdempotencyStore
from proxy.idempotency.redis_store import RedisIdempotencyStore
from proxy.idempotency.store import (
    Claimed,
    ClaimResult,
    Completed,
    IdempotencyStore,
    InFlight,
    Mismatch,
    StoredResponse,
    Unresolved,
)
from proxy.idempotency.transactions import (
    MemoryTransactionStore,
    RedisTransactionStore,
    TransactionStore,
)

REDIS_URL = "redis://127.0.0.1:6379/0"
TTL = 60.0
LOCK = 30.0
SHORT = 0.25  # a TTL that a scenario lets pass
PAST_SHORT = 0.4  # how long "letting it pass" waits

RESPONSE = StoredResponse(
    status=201,
    headers=(
        ("Content-Type", "application/json"),
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
        ("X-Note", "caf\u00e9 \u20ac"),
    ),
    body=bytes(range(256)) + b'{"id":"ch_1"}',
    gateway="stripe-eu",
    transaction_id="txn-1",
)


@dataclass
class Harness:
    store: IdempotencyStore
    advance: Callable[[float], Awaitable[None]]
    make_transactions: Callable[[float], TransactionStore]


async def redis_client_or_fail() -> Redis:
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(f"Redis at {REDIS_URL} is unreachable ({exc!r}); these tests need it")
    return client


async def delete_prefix(client: Redis, prefix: str) -> None:
    keys = [key async for key in client.scan_iter(match=f"{prefix}*", count=1000)]
    if keys:
        await client.delete(*keys)


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.redis)])
async def harness(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    if request.param == "memory":
        clock = ManualClock()

        async def advance_clock(seconds: float) -> None:
            clock.advance(seconds)

        yield Harness(
            store=MemoryIdempotencyStore(clock=clock),
            advance=advance_clock,
            make_transactions=lambda ttl: MemoryTransactionStore(clock=clock, ttl=ttl),
        )
        return
    client = await redis_client_or_fail()
    prefix = f"payswitch-test-{uuid.uuid4().hex}:"
    try:
        yield Harness(
            store=RedisIdempotencyStore(client, prefix=prefix),
            advance=asyncio.sleep,
            make_transactions=lambda ttl: RedisTransactionStore(client, prefix=prefix, ttl=ttl),
        )
    finally:
        await delete_prefix(client, prefix)
        await client.aclose()


def lease_of(result: ClaimResult) -> str:
    assert isinstance(result, Claimed | Unresolved), result
    return result.lease


Scenario = Callable[[Harness], Awaitable[None]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


@scenario
async def concurrent_claims_have_exactly_one_winner(h: Harness) -> None:
    results = await asyncio.gather(
        *(h.store.claim("k", "fp", TTL, lock_ttl=LOCK) for _ in range(50))
    )
    kinds = [type(r).__name__ for r in results]
    assert kinds.count("Claimed") == 1, kinds
    assert kinds.count("InFlight") == 49, kinds


@scenario
async def a_completed_key_replays_byte_identical(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.complete("k", lease, RESPONSE, TTL)
    for _ in range(2):
        replay = await h.store.claim("k", "fp", TTL, lock_ttl=LOCK)
        assert isinstance(replay, Completed)
        assert replay.response == RESPONSE
        assert replay.response.body == RESPONSE.body


@scenario
async def a_different_payload_is_a_mismatch_in_flight_and_after(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert isinstance(await h.store.claim("k", "other", TTL, lock_ttl=LOCK), Mismatch)
    assert await h.store.complete("k", lease, RESPONSE, TTL)
    assert isinstance(await h.store.claim("k", "other", TTL, lock_ttl=LOCK), Mismatch)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), Completed)


@scenario
async def an_in_flight_key_says_when_its_holder_is_presumed_dead(h: Harness) -> None:
    lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    busy = await h.store.claim("k", "fp", TTL, lock_ttl=LOCK)
    assert isinstance(busy, InFlight)
    assert LOCK - 1 < busy.retry_after <= LOCK


@scenario
async def a_released_key_is_claimable_again(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.release("k", lease)
    assert not await h.store.release("k", lease)
    again = await h.store.claim("k", "other-payload-is-fine-now", TTL, lock_ttl=LOCK)
    assert isinstance(again, Claimed)
    assert again.lease != lease


@scenario
async def an_unknown_outcome_is_taken_over_with_its_last_gateway(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.record_attempt(
        "k", lease, gateway="stripe-eu", attempt_id="att-0", transaction_id="txn-1"
    )
    assert await h.store.mark_unknown("k", lease, "adyen-eu", "att-1", TTL)
    takeover = await h.store.claim("k", "fp", TTL, lock_ttl=LOCK)
    assert takeover == Unresolved(
        lease=lease_of(takeover),
        cause="unknown",
        last_gateway="adyen-eu",
        attempt_id="att-1",
        transaction_id="txn-1",
        unresolved_count=1,
    )
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), InFlight)
    assert not await h.store.complete("k", lease, RESPONSE, TTL)
    assert await h.store.complete("k", lease_of(takeover), RESPONSE, TTL)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), Completed)


@scenario
async def repeated_unknown_outcomes_count_and_follow_the_gateway(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.mark_unknown("k", lease, "adyen-eu", "att-1", TTL, transaction_id="t1")
    second = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.mark_unknown("k", second, "adyen-us", "att-2", TTL)
    third = await h.store.claim("k", "fp", TTL, lock_ttl=LOCK)
    assert isinstance(third, Unresolved)
    assert (third.last_gateway, third.attempt_id, third.transaction_id) == (
        "adyen-us",
        "att-2",
        "t1",
    )
    assert third.unresolved_count == 2


@scenario
async def releasing_a_taken_over_key_keeps_it_unresolved(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.mark_unknown("k", lease, "adyen-eu", "att-1", TTL)
    takeover = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.release("k", takeover)  # e.g. its gateway was down: nothing sent
    again = await h.store.claim("k", "fp", TTL, lock_ttl=LOCK)
    assert isinstance(again, Unresolved)
    assert (again.last_gateway, again.unresolved_count) == ("adyen-eu", 1)


@scenario
async def only_the_lease_holder_may_write(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    forged = "0" * 32
    assert not await h.store.complete("k", forged, RESPONSE, TTL)
    assert not await h.store.mark_unknown("k", forged, "g", "a", TTL)
    assert not await h.store.record_attempt("k", forged, gateway="g", attempt_id="a")
    assert not await h.store.release("k", forged)
    assert not await h.store.complete("other-key", lease, RESPONSE, TTL)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), InFlight)
    assert await h.store.complete("k", lease, RESPONSE, TTL)
    assert not await h.store.complete("k", lease, RESPONSE, TTL)  # once only
    assert not await h.store.release("k", lease)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), Completed)


@scenario
async def a_dead_holder_leaves_the_key_unresolved_not_free(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=SHORT))
    assert await h.store.record_attempt("k", lease, gateway="stripe-eu", attempt_id="att-1")
    await h.advance(PAST_SHORT)  # the holder never comes back
    takeover = await h.store.claim("k", "fp", TTL, lock_ttl=LOCK)
    assert isinstance(takeover, Unresolved)
    assert takeover.cause == "lock_expired"
    assert (takeover.last_gateway, takeover.attempt_id) == ("stripe-eu", "att-1")
    assert takeover.unresolved_count == 1
    assert not await h.store.complete("k", lease, RESPONSE, TTL)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), InFlight)


@scenario
async def a_holder_lost_before_any_attempt_leaves_no_gateway(h: Harness) -> None:
    lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=SHORT))
    await h.advance(PAST_SHORT)
    takeover = await h.store.claim("k", "fp", TTL, lock_ttl=LOCK)
    assert isinstance(takeover, Unresolved)
    assert (takeover.cause, takeover.last_gateway, takeover.attempt_id) == (
        "lock_expired",
        None,
        None,
    )


@scenario
async def a_slow_holder_not_yet_replaced_may_still_complete(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=SHORT))
    await h.advance(PAST_SHORT)
    assert await h.store.complete("k", lease, RESPONSE, TTL)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), Completed)


@scenario
async def a_completed_key_is_forgotten_after_its_ttl(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.complete("k", lease, RESPONSE, SHORT)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), Completed)
    await h.advance(PAST_SHORT)
    assert isinstance(await h.store.claim("k", "other", TTL, lock_ttl=LOCK), Claimed)


@scenario
async def an_unresolved_key_is_forgotten_after_its_ttl(h: Harness) -> None:
    lease = lease_of(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.mark_unknown("k", lease, "adyen-eu", "att-1", SHORT)
    await h.advance(PAST_SHORT)
    assert isinstance(await h.store.claim("k", "fp", TTL, lock_ttl=LOCK), Claimed)


@scenario
async def keys_are_independent(h: Harness) -> None:
    a = lease_of(await h.store.claim("a", "fp", TTL, lock_ttl=LOCK))
    b = lease_of(await h.store.claim("b", "fp", TTL, lock_ttl=LOCK))
    assert await h.store.complete("a", a, RESPONSE, TTL)
    assert isinstance(await h.store.claim("b", "fp", TTL, lock_ttl=LOCK), InFlight)
    assert await h.store.release("b", b)
    assert isinstance(await h.store.claim("a", "fp", TTL, lock_ttl=LOCK), Completed)
    assert isinstance(await h.store.claim("b", "fp", TTL, lock_ttl=LOCK), Claimed)


@scenario
async def odd_but_valid_keys_are_stored_as_given(h: Harness) -> None:
    keys = ["s5:alice:{x}", "k:*?[]", "s0::}{", "k:" + "x" * 255]
    for key in keys:
        lease = lease_of(await h.store.claim(key, "fp", TTL, lock_ttl=LOCK))
        assert await h.store.complete(key, lease, RESPONSE, TTL)
    for key in keys:
        assert isinstance(await h.store.claim(key, "fp", TTL, lock_ttl=LOCK), Completed)
    assert isinstance(await h.store.claim("k:x", "fp", TTL, lock_ttl=LOCK), Claimed)


@scenario
async def transaction_records_round_trip_and_expire(h: Harness) -> None:
    log = h.make_transactions(SHORT)
    record = {"transaction_id": "t1", "state": "PENDING", "attempts": [{"gateway": "g"}]}
    await log.put(record)
    await log.put({"transaction_id": "t2", "state": "UNKNOWN"})
    await log.put({**record, "state": "SUCCESS"})
    assert await log.get("t1") == {**record, "state": "SUCCESS"}
    assert await log.get("t3") is None
    await h.advance(PAST_SHORT)
    assert await log.get("t1") is None
    assert await log.get("t2") is None


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_store_behaviour(harness: Harness, name: str) -> None:
    await SCENARIOS[name](harness)
