"""The idempotency store for a single sidecar: bounded, expiring, in process memory.

Owns: `MemoryIdempotencyStore`, its entries, their TTLs on the injected clock, and the two
bounds (entry count and stored response bytes) with the eviction order that keeps them.
Must not: await anything between reading and writing an entry. Every method runs to the end
without yielding, which is what makes a claim atomic among the event loop's tasks; it is
not thread-safe and is not shared between processes (use `redis_store` for replicas).

Eviction order when a bound is exceeded: completed entries, least recently used first
(a retry then reaches a gateway again, with the same Idempotency-Key forwarded for it to
dedupe); then unresolved entries, oldest first; in-flight claims never. In-flight claims
are always admitted even over the cap, because refusing one would fail a payment and their
number is bounded by the listener's concurrency; the store logs when that happens. A single
response larger than the whole byte budget is still kept (every other completed entry is
evicted for it) so the bound is max(max_stored_bytes, largest response).
"""

from __future__ import annotations

import heapq
import itertools
import logging
from collections import OrderedDict
from typing import Literal

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.idempotency.store import (
    Claimed,
    ClaimResult,
    Completed,
    InFlight,
    Mismatch,
    StoredResponse,
    Unresolved,
    UnresolvedCause,
    check_ttl,
    new_lease,
)

logger = logging.getLogger(__name__)

_State = Literal["inflight", "completed", "unresolved"]


class _Entry:
    """One key's mutable record; lives only inside the store."""

    __slots__ = (
        "attempt_id",
        "cause",
        "expires_at",
        "fingerprint",
        "last_gateway",
        "lease",
        "lock_expires_at",
        "response",
        "state",
        "transaction_id",
        "unresolved_count",
    )

    def __init__(self, *, fingerprint: str, lease: str, expires_at: float, lock_expires_at: float):
        self.state: _State = "inflight"
        self.fingerprint = fingerprint
        self.lease: str | None = lease
        self.expires_at = expires_at
        self.lock_expires_at = lock_expires_at
        self.response: StoredResponse | None = None
        self.last_gateway: str | None = None
        self.attempt_id: str | None = None
        self.transaction_id: str | None = None
        self.unresolved_count = 0
        self.cause: UnresolvedCause = "unknown"


class MemoryIdempotencyStore:
    """`IdempotencyStore` in process memory; see the module docstring for its bounds."""

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        max_entries: int = 100_000,
        max_stored_bytes: int = 64 * 1024 * 1024,
        default_lock_ttl: float = 60.0,
    ) -> None:
        if max_entries < 1 or max_stored_bytes < 1:
            raise ValueError("max_entries and max_stored_bytes must be at least 1")
        self._clock = clock
        self._max_entries = max_entries
        self._max_bytes = max_stored_bytes
        self._default_lock_ttl = check_ttl("default_lock_ttl", default_lock_ttl)
        self._tiers: dict[_State, OrderedDict[str, _Entry]] = {
            "inflight": OrderedDict(),
            "completed": OrderedDict(),
            "unresolved": OrderedDict(),
        }
        self._expiry: list[tuple[float, int, str]] = []
        self._seq = 0
        self._bytes = 0
        self._over_cap = False
        self.evictions = 0

    def __len__(self) -> int:
        return sum(len(tier) for tier in self._tiers.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of completed responses held now (see `StoredResponse.size`)."""
        return self._bytes

    def count(self, state: _State) -> int:
        return len(self._tiers[state])

    async def claim(
        self, key: str, fingerprint: str, ttl: float, *, lock_ttl: float | None = None
    ) -> ClaimResult:
        check_ttl("ttl", ttl)
        lock = check_ttl("lock_ttl", self._default_lock_ttl if lock_ttl is None else lock_ttl)
        now = self._clock.now()
        self._purge(now)
        entry = self._get(key, now)
        if entry is None:
            lease = new_lease()
            entry = _Entry(
                fingerprint=fingerprint,
                lease=lease,
                expires_at=now + max(ttl, lock),
                lock_expires_at=now + lock,
            )
            self._tiers["inflight"][key] = entry
            self._schedule(key, entry.expires_at)
            self._enforce_bounds(keep=key)
            return Claimed(lease=lease)
        if entry.fingerprint != fingerprint:
            return Mismatch()
        if entry.state == "completed":
            assert entry.response is not None
            self._tiers["completed"].move_to_end(key)
            return Completed(response=entry.response)
        if entry.state == "inflight":
            if entry.lock_expires_at > now:
                return InFlight(retry_after=entry.lock_expires_at - now)
            logger.warning(
                "idempotency claim %r outlived its lock; its holder is presumed lost", key
            )
            entry.cause = "lock_expired"
            entry.unresolved_count += 1
        lease = new_lease()
        self._move(key, entry, "inflight")
        entry.lease = lease
        entry.lock_expires_at = now + lock
        entry.expires_at = now + max(ttl, lock)
        self._schedule(key, entry.expires_at)
        return Unresolved(
            lease=lease,
            cause=entry.cause,
            last_gateway=entry.last_gateway,
            attempt_id=entry.attempt_id,
            transaction_id=entry.transaction_id,
            unresolved_count=entry.unresolved_count,
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
        entry = self._held(key, lease)
        if entry is None:
            return False
        entry.last_gateway = gateway
        entry.attempt_id = attempt_id
        if transaction_id is not None:
            entry.transaction_id = transaction_id
        return True

    async def complete(self, key: str, lease: str, response: StoredResponse, ttl: float) -> bool:
        check_ttl("ttl", ttl)
        entry = self._held(key, lease)
        if entry is None:
            return False
        now = self._clock.now()
        self._move(key, entry, "completed")
        entry.lease = None
        entry.response = response
        entry.last_gateway = response.gateway
        entry.transaction_id = response.transaction_id
        entry.expires_at = now + ttl
        self._bytes += response.size
        self._schedule(key, entry.expires_at)
        self._enforce_bounds(keep=key)
        return True

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
        check_ttl("ttl", ttl)
        entry = self._held(key, lease)
        if entry is None:
            return False
        self._move(key, entry, "unresolved")
        entry.lease = None
        entry.cause = "unknown"
        entry.unresolved_count += 1
        entry.last_gateway = gateway
        entry.attempt_id = attempt_id
        if transaction_id is not None:
            entry.transaction_id = transaction_id
        entry.expires_at = self._clock.now() + ttl
        self._schedule(key, entry.expires_at)
        self._enforce_bounds(keep=key)
        return True

    async def release(self, key: str, lease: str) -> bool:
        entry = self._held(key, lease)
        if entry is None:
            return False
        if entry.unresolved_count:
            # An earlier holder's outcome is still unknown; this holder sending nothing
            # changes none of that.
            self._move(key, entry, "unresolved")
            entry.lease = None
        else:
            self._remove(key, entry)
        return True

    async def close(self) -> None:
        for tier in self._tiers.values():
            tier.clear()
        self._expiry.clear()
        self._bytes = 0

    # -- internals; none of these awaits --------------------------------------------------

    def _get(self, key: str, now: float) -> _Entry | None:
        for tier in self._tiers.values():
            entry = tier.get(key)
            if entry is not None:
                if entry.expires_at <= now:
                    self._remove(key, entry)
                    return None
                return entry
        return None

    def _held(self, key: str, lease: str) -> _Entry | None:
        """The in-flight entry for `key` if `lease` still holds it."""
        entry = self._get(key, self._clock.now())
        if entry is None or entry.state != "inflight" or entry.lease != lease:
            return None
        return entry

    def _move(self, key: str, entry: _Entry, state: _State) -> None:
        del self._tiers[entry.state][key]
        if entry.state == "completed" and entry.response is not None:
            self._bytes -= entry.response.size
            entry.response = None
        entry.state = state
        self._tiers[state][key] = entry

    def _remove(self, key: str, entry: _Entry) -> None:
        del self._tiers[entry.state][key]
        if entry.response is not None:
            self._bytes -= entry.response.size
            entry.response = None

    def _schedule(self, key: str, expires_at: float) -> None:
        self._seq += 1
        heapq.heappush(self._expiry, (expires_at, self._seq, key))
        # Each re-arm leaves a stale heap item behind; rebuild before they outnumber entries.
        if len(self._expiry) > 2 * len(self) + 1024:
            self._expiry = [
                (entry.expires_at, seq, k)
                for seq, (k, entry) in enumerate(
                    (k, e) for tier in self._tiers.values() for k, e in tier.items()
                )
            ]
            heapq.heapify(self._expiry)

    def _purge(self, now: float) -> None:
        while self._expiry and self._expiry[0][0] <= now:
            _, _, key = heapq.heappop(self._expiry)
            self._get(key, now)  # removes it if it really expired, not just re-armed

    def _enforce_bounds(self, *, keep: str) -> None:
        completed = self._tiers["completed"]
        unresolved = self._tiers["unresolved"]
        # The newest completed entry is never evicted for bytes: when it alone is over the
        # budget it stays, until the next completion pushes it out.
        while self._bytes > self._max_bytes and len(completed) > 1:
            self._evict(*next(iter(completed.items())))
        if self._bytes > self._max_bytes and keep in completed:
            logger.warning(
                "idempotent response for %r (%d bytes) exceeds the whole store budget",
                keep,
                self._bytes,
            )
        while len(self) > self._max_entries:
            candidates = itertools.chain(completed.items(), unresolved.items())
            victim = next((item for item in candidates if item[0] != keep), None)
            if victim is None:
                if not self._over_cap:
                    logger.warning(
                        "idempotency store holds %d entries, over its cap of %d, "
                        "because in-flight claims are never evicted",
                        len(self),
                        self._max_entries,
                    )
                self._over_cap = True
                return
            self._evict(*victim)
        self._over_cap = False

    def _evict(self, key: str, entry: _Entry) -> None:
        self.evictions += 1
        if entry.state == "unresolved":
            # Forgetting an unknown outcome lets a retry go to any gateway: say so loudly.
            logger.warning("evicting unresolved idempotency key %r to stay within bounds", key)
        else:
            logger.debug("evicting %s idempotency key %r to stay within bounds", entry.state, key)
        self._remove(key, entry)
