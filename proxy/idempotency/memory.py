"""The idempotency store for a single sidecar: bounded by bytes, expiring, in process memory.

Owns: `MemoryIdempotencyStore`, its entries, their TTLs on the injected clock, the one byte
budget they share (an estimate of what each entry costs the process, not just its response
body), what happens when the budget is spent, and the eviction counts that make it visible.
Must not: await anything between reading and writing an entry. Every method runs to the end
without yielding, which is what makes a claim atomic among the event loop's tasks; it is
not thread-safe and is not shared between processes (use `redis_store` for replicas).

When the budget is spent (`when_full`):
- "evict" (default): completed entries go, least recently used first. A retry of an evicted
  key then reaches a gateway again with the same Idempotency-Key forwarded, which a
  provider that dedupes keys recognises; the store says so loudly (a warning a minute with
  the count and the replay window left, and `evictions` by state for the metrics).
- "refuse": nothing unexpired is evicted; a new key is refused with `StoreFull` (the request
  path answers 503 with Retry-After) until entries expire.
Unresolved entries (an outcome was lost) are never evicted in either mode: forgetting one
would let a retry go to a gateway that cannot dedupe it. In-flight claims are never evicted
either. A completion is always stored, even over the budget: the payment happened.
"""

from __future__ import annotations

import heapq
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
    StoreFull,
    Unresolved,
    UnresolvedCause,
    check_ttl,
    new_lease,
)

logger = logging.getLogger(__name__)

_State = Literal["inflight", "completed", "unresolved"]
WhenFull = Literal["evict", "refuse"]

#: What one entry costs the process beyond its key, fingerprint and stored response: the
#: entry object, its lease and ids, the dict slot and the expiry heap item (measured with
#: tracemalloc on CPython 3.11: ~560 bytes with a 30-byte key and a 64-byte fingerprint).
ENTRY_OVERHEAD = 480

#: The default budget: ~24,000 completed payments with small JSON answers. At 100
#: payments/s that is a replay window of about 4 minutes; a longer one belongs in Redis.
DEFAULT_MAX_BYTES = 16 * 1024 * 1024

#: Seconds between two "evicting" warnings while the store keeps evicting.
WARN_EVERY = 60.0


class _Entry:
    """One key's mutable record; lives only inside the store."""

    __slots__ = (
        "attempt_id",
        "cause",
        "completed_at",
        "cost",
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
        self.cost = 0  # bytes charged to the budget for this entry now
        self.completed_at = 0.0


class MemoryIdempotencyStore:
    """`IdempotencyStore` in process memory; see the module docstring for its bounds."""

    def __init__(
        self,
        *,
        clock: Clock = SYSTEM_CLOCK,
        max_bytes: int = DEFAULT_MAX_BYTES,
        when_full: WhenFull = "evict",
        default_lock_ttl: float = 60.0,
    ) -> None:
        if max_bytes < ENTRY_OVERHEAD:
            raise ValueError(f"max_bytes must be at least {ENTRY_OVERHEAD}")
        if when_full not in ("evict", "refuse"):
            raise ValueError(f"when_full must be 'evict' or 'refuse', not {when_full!r}")
        self._clock = clock
        self._max_bytes = max_bytes
        self._when_full: WhenFull = when_full
        self._default_lock_ttl = check_ttl("default_lock_ttl", default_lock_ttl)
        self._tiers: dict[_State, OrderedDict[str, _Entry]] = {
            "inflight": OrderedDict(),
            "completed": OrderedDict(),
            "unresolved": OrderedDict(),
        }
        self._expiry: list[tuple[float, int, str]] = []
        self._seq = 0
        self._bytes = 0  # stored response bytes
        self._held_bytes = 0  # every entry's cost, responses included
        self._warned_at = -WARN_EVERY
        self._evicted_since_warning = 0
        self.evictions: dict[_State, int] = {"completed": 0, "unresolved": 0, "inflight": 0}
        self.refusals = 0

    def __len__(self) -> int:
        return sum(len(tier) for tier in self._tiers.values())

    @property
    def stored_bytes(self) -> int:
        """Bytes of completed responses held now (see `StoredResponse.size`)."""
        return self._bytes

    @property
    def held_bytes(self) -> int:
        """What every entry costs together, as charged against `max_bytes`."""
        return self._held_bytes

    @property
    def max_bytes(self) -> int:
        return self._max_bytes

    def count(self, state: _State) -> int:
        return len(self._tiers[state])

    def replay_window(self) -> float | None:
        """Age in seconds of the oldest completed entry still held: how far back a retry is
        still replayed. None when nothing is held."""
        completed = self._tiers["completed"]
        if not completed:
            return None
        oldest = next(iter(completed.values()))
        return max(0.0, self._clock.now() - oldest.completed_at)

    def holds(self, key: str) -> bool:
        """Whether `key` has an unexpired entry here, whatever its state."""
        return self._get(key, self._clock.now()) is not None

    async def claim(
        self, key: str, fingerprint: str, ttl: float, *, lock_ttl: float | None = None
    ) -> ClaimResult:
        check_ttl("ttl", ttl)
        lock = check_ttl("lock_ttl", self._default_lock_ttl if lock_ttl is None else lock_ttl)
        now = self._clock.now()
        self._purge(now)
        entry = self._get(key, now)
        if entry is None:
            cost = ENTRY_OVERHEAD + len(key) + len(fingerprint)
            if not self._make_room(cost):
                self.refusals += 1
                raise StoreFull(
                    f"the in-memory idempotency store is full ({self._held_bytes} of"
                    f" {self._max_bytes} bytes held by unexpired keys)",
                    retry_after=self._next_expiry(now),
                )
            lease = new_lease()
            entry = _Entry(
                fingerprint=fingerprint,
                lease=lease,
                expires_at=now + max(ttl, lock),
                lock_expires_at=now + lock,
            )
            entry.cost = cost
            self._held_bytes += cost
            self._tiers["inflight"][key] = entry
            self._schedule(key, entry.expires_at)
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
        entry.completed_at = now
        self._bytes += response.size
        self._held_bytes += response.size
        entry.cost += response.size
        self._schedule(key, entry.expires_at)
        if self._held_bytes > self._max_bytes:
            if self._when_full == "evict":
                self._make_room(0, keep=key)
            if self._held_bytes > self._max_bytes and response.size > self._max_bytes // 2:
                logger.warning(
                    "idempotent response for %r (%d bytes) is over half the whole store budget",
                    key,
                    response.size,
                )
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

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        for tier in self._tiers.values():
            tier.clear()
        self._expiry.clear()
        self._bytes = 0
        self._held_bytes = 0

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
        if entry.state == "completed":
            self._drop_response(entry)
        entry.state = state
        self._tiers[state][key] = entry

    def _remove(self, key: str, entry: _Entry) -> None:
        del self._tiers[entry.state][key]
        self._drop_response(entry)
        self._held_bytes -= entry.cost
        entry.cost = 0

    def _drop_response(self, entry: _Entry) -> None:
        if entry.response is not None:
            size = entry.response.size
            self._bytes -= size
            self._held_bytes -= size
            entry.cost -= size
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

    def _next_expiry(self, now: float) -> float:
        """Seconds until the first entry expires (a Retry-After for a refused claim)."""
        return max(1.0, self._expiry[0][0] - now) if self._expiry else 1.0

    def _make_room(self, cost: int, *, keep: str | None = None) -> bool:
        """Free the budget for `cost` more bytes as `when_full` allows; False if it cannot."""
        if self._held_bytes + cost <= self._max_bytes:
            return True
        if self._when_full == "refuse":
            return False
        completed = self._tiers["completed"]
        while self._held_bytes + cost > self._max_bytes:
            victim = next((item for item in completed.items() if item[0] != keep), None)
            if victim is None:
                return False
            self._evict(*victim)
        return True

    def _evict(self, key: str, entry: _Entry) -> None:
        self.evictions[entry.state] += 1
        self._evicted_since_warning += 1
        now = self._clock.now()
        if now - self._warned_at >= WARN_EVERY:
            window = now - entry.completed_at
            logger.warning(
                "idempotency store full (%d bytes): evicted %d completed key(s) before their"
                " TTL; retries older than %.0fs are no longer replayed here (the forwarded"
                " Idempotency-Key still lets the provider dedupe them). Raise the budget or"
                " use Redis for a longer window.",
                self._max_bytes,
                self._evicted_since_warning,
                window,
            )
            self._warned_at = now
            self._evicted_since_warning = 0
        self._remove(key, entry)
