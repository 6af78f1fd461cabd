"""The transaction log behind `GET /admin/transactions/{id}`.

Owns: `TransactionStore` (put a whole record, get it back by transaction id) and its two
implementations: bounded and expiring in memory, and JSON strings with a TTL in Redis.
Must not: interpret records beyond their `transaction_id` (states, attempts and their
meaning belong to the request path), or keep anything forever.

A record is a JSON object; `put` replaces the whole record for its id, so the writer sends
the full current state each time (PENDING, then SUCCESS / FAILURE / UNKNOWN). Both stores
hand out a fresh copy, so a caller can never change what another caller reads.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

import orjson

from proxy.clock import SYSTEM_CLOCK, Clock, MonotonicClock
from proxy.idempotency.store import check_ttl

if TYPE_CHECKING:
    # Imported where a Redis store is made: a sidecar on the memory store never loads the
    # client library (about 9 MiB of RSS).
    from redis.asyncio import Redis

logger = logging.getLogger(__name__)


class TransactionStore(Protocol):
    async def put(self, record: Mapping[str, Any]) -> None:
        """Store `record` (it must carry a non-empty string `transaction_id`) for the TTL."""
        ...

    async def get(self, transaction_id: str) -> dict[str, Any] | None:
        """The last record put for `transaction_id`, or None when unknown or expired."""
        ...

    async def close(self) -> None: ...


def _encode(record: Mapping[str, Any]) -> tuple[str, str]:
    """(transaction id, JSON text) of `record`, or ValueError/TypeError saying why not.

    Text, not the bytes orjson returns: those keep orjson's whole growth buffer
    allocated, so thousands of held records would cost several times their length (the
    hostile-reload test's RSS bound caught it)."""
    transaction_id = record.get("transaction_id")
    if not isinstance(transaction_id, str) or not transaction_id:
        raise ValueError("a transaction record needs a non-empty string 'transaction_id'")
    return transaction_id, orjson.dumps(record).decode()


def _decode(text: str | bytes) -> dict[str, Any]:
    value = orjson.loads(text)
    if not isinstance(value, dict):
        raise ValueError("stored transaction record is not a JSON object")
    return value


#: What one record costs beyond its JSON text and id: the tuple, the dict slot, the str
#: headers (measured with tracemalloc on CPython 3.11: ~265 bytes).
RECORD_OVERHEAD = 240

#: The default budget: ~9,000 records of a one-attempt payment (~600 bytes each), about
#: 90 seconds at 100 payments/s. The lasting record of every payment is the event stream
#: (`transaction.*` events, the Kafka topic) or the Redis store; this one answers
#: `GET /admin/transactions/{id}` for recent payments on a sidecar.
DEFAULT_MAX_BYTES = 4 * 1024 * 1024


class MemoryTransactionStore:
    """The newest records that fit in `max_bytes`, each forgotten `ttl` seconds after its
    last put; the oldest go first, counted in `evictions`."""

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        ttl: float = 86400.0,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        self._clock = clock
        # Read once per put: the system clock's now is time.monotonic behind a Python call.
        self._now = time.monotonic if type(clock) is MonotonicClock else clock.now
        self._ttl = check_ttl("ttl", ttl)
        self._max = max_bytes
        self._bytes = 0
        self.evictions = 0
        # Ordered by last put; with one TTL for all, that is also expiry order.
        self._records: OrderedDict[str, tuple[float, str]] = OrderedDict()
        # No record expires before this: the oldest's expiry, or earlier (an eviction or a
        # re-put took the oldest away), so a put does not look at the oldest every time.
        self._purge_at = math.inf

    def __len__(self) -> int:
        return len(self._records)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    async def put(self, record: Mapping[str, Any]) -> None:
        transaction_id, text = _encode(record)
        now = self._now()
        if now >= self._purge_at:
            self._purge(now)
        records = self._records
        prior = records.pop(transaction_id, None)
        # `_cost` written out: once per payment, and the id's length cancels on a re-put.
        if prior is not None:
            self._bytes -= len(prior[1])
        else:
            self._bytes += RECORD_OVERHEAD + len(transaction_id)
        expires_at = now + self._ttl
        records[transaction_id] = (expires_at, text)
        if expires_at < self._purge_at:  # the store was empty: this is the oldest
            self._purge_at = expires_at
        self._bytes += len(text)
        while self._bytes > self._max and len(self._records) > 1:
            self._drop_oldest()
            self.evictions += 1

    async def get(self, transaction_id: str) -> dict[str, Any] | None:
        now = self._clock.now()
        if now >= self._purge_at:
            self._purge(now)
        found = self._records.get(transaction_id)
        return None if found is None else _decode(found[1])

    async def close(self) -> None:
        self._records.clear()
        self._bytes = 0
        self._purge_at = math.inf

    def _purge(self, now: float) -> None:
        while self._records:
            expires_at, _ = next(iter(self._records.values()))
            if expires_at > now:
                self._purge_at = expires_at
                return
            self._drop_oldest()
        self._purge_at = math.inf

    def _drop_oldest(self) -> None:
        transaction_id, (_, text) = self._records.popitem(last=False)
        self._bytes -= _cost(transaction_id, text)


def _cost(transaction_id: str, text: str) -> int:
    return RECORD_OVERHEAD + len(transaction_id) + len(text)


class RedisTransactionStore:
    """Records as JSON strings at `<prefix>txn:<id>`, expired by Redis after `ttl`."""

    def __init__(
        self, client: Redis, *, prefix: str, ttl: float = 86400.0, owns_client: bool = False
    ) -> None:
        self._client = client
        self._prefix = prefix
        self._ttl_ms = max(1, math.ceil(check_ttl("ttl", ttl) * 1000))
        self._owns_client = owns_client

    @classmethod
    def from_url(cls, url: str, prefix: str, *, ttl: float = 86400.0) -> RedisTransactionStore:
        """A store with its own connection pool to `url`, closed by `close()`."""
        from redis.asyncio import Redis

        from proxy.idempotency.redis_store import REDIS_TIMEOUT

        client = Redis.from_url(
            url,
            decode_responses=False,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
        )
        return cls(client, prefix=prefix, ttl=ttl, owns_client=True)

    async def put(self, record: Mapping[str, Any]) -> None:
        transaction_id, text = _encode(record)
        await self._client.set(f"{self._prefix}txn:{transaction_id}", text, px=self._ttl_ms)

    async def get(self, transaction_id: str) -> dict[str, Any] | None:
        text = await self._client.get(f"{self._prefix}txn:{transaction_id}")
        return None if text is None else _decode(text)

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
