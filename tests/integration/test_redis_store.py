"""The Redis idempotency store and transaction log against the real server on 127.0.0.1.

What only Redis has: replicas sharing keys through separate clients, the key layout and
its expiries, and connection ownership. Behaviours shared with the memory store are in
test_store_conformance.py. Without Redis these tests fail, they do not skip.
"""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator

import pytest
from redis.asyncio import Redis
from redis.exceptions import RedisError

from proxy.idempotency.redis_store import RedisIdempotencyStore
from proxy.idempotency.store import Claimed, Completed, InFlight, StoredResponse, Unresolved
from proxy.idempotency.transactions import RedisTransactionStore

pytestmark = pytest.mark.redis

REDIS_URL = "redis://127.0.0.1:6379/0"
TTL = 60.0
LOCK = 30.0

RESPONSE = StoredResponse(
    status=402,
    headers=(("Content-Type", "application/json"), ("X-Decline", "insufficient_funds")),
    body=b'{"error":"card_declined"}\x00\xff',
    gateway="stripe-eu",
    transaction_id="txn-1",
)


async def connect_or_fail(url: str) -> Redis:
    client = Redis.from_url(url, socket_connect_timeout=2)
    try:
        await client.ping()
    except (RedisError, OSError) as exc:
        await client.aclose()
        pytest.fail(f"Redis at {url} is unreachable ({exc!r}); these tests need it")
    return client


@pytest.fixture
async def prefix() -> AsyncIterator[str]:
    client = await connect_or_fail(REDIS_URL)
    name = f"payswitch-test-{uuid.uuid4().hex}:"
    try:
        yield name
    finally:
        keys = [key async for key in client.scan_iter(match=f"{name}*", count=1000)]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest.fixture
async def client() -> AsyncIterator[Redis]:
    connection = await connect_or_fail(REDIS_URL)
    yield connection
    await connection.aclose()


async def test_an_unreachable_redis_fails_the_test_loudly() -> None:
    with socket.socket() as probe:  # a loopback port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(pytest.fail.Exception, match="unreachable"):
        await connect_or_fail(f"redis://127.0.0.1:{port}/0")


async def test_two_replicas_sharing_redis_dispatch_once(prefix: str) -> None:
    a = RedisIdempotencyStore.from_url(REDIS_URL, prefix)
    b = RedisIdempotencyStore.from_url(REDIS_URL, prefix)
    try:
        stores = [a, b] * 25
        results = await asyncio.gather(*(s.claim("k", "fp", TTL, lock_ttl=LOCK) for s in stores))
        winners = [(s, r) for s, r in zip(stores, results, strict=True) if isinstance(r, Claimed)]
        assert len(winners) == 1
        assert sum(isinstance(r, InFlight) for r in results) == 49
        holder, claim = winners[0]
        other = b if holder is a else a
        assert not await other.complete("k", "0" * 32, RESPONSE, TTL)
        assert await holder.complete("k", claim.lease, RESPONSE, TTL)
        replay = await other.claim("k", "fp", TTL, lock_ttl=LOCK)
        assert isinstance(replay, Completed)
        assert replay.response == RESPONSE
    finally:
        await a.close()
        await b.close()


async def test_a_replica_that_dies_mid_attempt_hands_its_gateway_to_the_next(
    prefix: str,
) -> None:
    dying = RedisIdempotencyStore.from_url(REDIS_URL, prefix)
    survivor = RedisIdempotencyStore.from_url(REDIS_URL, prefix)
    try:
        claim = await dying.claim("k", "fp", TTL, lock_ttl=0.2)
        assert isinstance(claim, Claimed)
        assert await dying.record_attempt(
            "k", claim.lease, gateway="adyen-eu", attempt_id="att-7", transaction_id="txn-7"
        )
        await dying.close()
        assert isinstance(await survivor.claim("k", "fp", TTL, lock_ttl=LOCK), InFlight)
        await asyncio.sleep(0.3)
        takeover = await survivor.claim("k", "fp", TTL, lock_ttl=LOCK)
        assert isinstance(takeover, Unresolved)
        assert (takeover.cause, takeover.last_gateway, takeover.transaction_id) == (
            "lock_expired",
            "adyen-eu",
            "txn-7",
        )
    finally:
        await survivor.close()


async def test_keys_live_under_the_prefix_with_redis_expiries(prefix: str, client: Redis) -> None:
    store = RedisIdempotencyStore(client, prefix=prefix)
    claim = await store.claim("k:abc", "fp", TTL, lock_ttl=LOCK)
    assert isinstance(claim, Claimed)
    record, lock = f"{prefix}idem:{{k:abc}}:r", f"{prefix}idem:{{k:abc}}:l"
    assert sorted([key async for key in client.scan_iter(match=f"{prefix}*")]) == sorted(
        [record.encode(), lock.encode()]
    )
    assert await client.get(lock) == claim.lease.encode()
    assert (TTL - 1) * 1000 < await client.pttl(record) <= TTL * 1000
    assert (LOCK - 1) * 1000 < await client.pttl(lock) <= LOCK * 1000

    assert await store.complete("k:abc", claim.lease, RESPONSE, 5)
    assert await client.exists(lock) == 0
    assert 4000 < await client.pttl(record) <= 5000
    assert await client.hget(record, "body") == RESPONSE.body
    assert await client.hget(record, "lease") is None


async def test_a_record_outlives_its_lock_even_with_a_short_key_ttl(
    prefix: str, client: Redis
) -> None:
    store = RedisIdempotencyStore(client, prefix=prefix)
    assert isinstance(await store.claim("k", "fp", 0.1, lock_ttl=LOCK), Claimed)
    await asyncio.sleep(0.2)
    assert isinstance(await store.claim("k", "fp", 0.1, lock_ttl=LOCK), InFlight)


async def test_a_vanished_record_with_a_live_lock_is_treated_as_in_flight(
    prefix: str, client: Redis
) -> None:
    store = RedisIdempotencyStore(client, prefix=prefix)
    assert isinstance(await store.claim("k", "fp", TTL, lock_ttl=LOCK), Claimed)
    await client.delete(f"{prefix}idem:{{k}}:r")  # as an evicting maxmemory policy would
    assert isinstance(await store.claim("k", "fp", TTL, lock_ttl=LOCK), InFlight)


async def test_close_closes_only_a_client_the_store_made(prefix: str, client: Redis) -> None:
    borrowed = RedisIdempotencyStore(client, prefix=prefix)
    await borrowed.close()
    assert await client.ping()

    owned = RedisIdempotencyStore.from_url(REDIS_URL, prefix)
    assert isinstance(await owned.claim("k", "fp", TTL), Claimed)
    owned_id = await owned._client.client_id()
    assert owned_id in await connected_ids(client)
    await owned.close()
    await asyncio.sleep(0.05)  # the server notices the hang-up asynchronously
    assert owned_id not in await connected_ids(client)


async def connected_ids(client: Redis) -> set[int]:
    return {int(entry["id"]) for entry in await client.client_list()}


def test_a_prefix_with_braces_is_refused(client: Redis) -> None:
    with pytest.raises(ValueError, match="braces"):
        RedisIdempotencyStore(client, prefix="payswitch-{x}:")


async def test_transactions_are_json_under_the_prefix_with_a_ttl(
    prefix: str, client: Redis
) -> None:
    log = RedisTransactionStore(client, prefix=prefix, ttl=120)
    record = {"transaction_id": "t1", "state": "UNKNOWN", "attempts": [{"id": "a1"}]}
    await log.put(record)
    assert await client.get(f"{prefix}txn:t1") == (
        b'{"transaction_id":"t1","state":"UNKNOWN","attempts":[{"id":"a1"}]}'
    )
    assert 119_000 < await client.pttl(f"{prefix}txn:t1") <= 120_000
    assert await log.get("t1") == record
    assert await log.get("nope") is None
    with pytest.raises(ValueError, match="transaction_id"):
        await log.put({"state": "PENDING"})


async def test_transaction_store_from_url_owns_its_connection(prefix: str) -> None:
    log = RedisTransactionStore.from_url(REDIS_URL, prefix, ttl=60)
    await log.put({"transaction_id": "t1"})
    assert await log.get("t1") == {"transaction_id": "t1"}
    await log.close()
