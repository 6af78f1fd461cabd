"""The contract every idempotency store keeps, and the values that cross it.

Owns: `IdempotencyStore` (the protocol the request path calls), the claim results
(`Claimed`, `InFlight`, `Completed`, `Mismatch`, `Unresolved`), `StoredResponse`, and the
small rules both stores share (lease tokens, TTL checks, which headers are stored).
Must not: hold state or do I/O; `memory` and `redis_store` implement this, and the request
path maps results to HTTP (409, 422, replay) itself.

The life of a key (DESIGN.md §5.4):

    (absent) --claim--> in flight --complete--> completed        (replayed until its TTL)
                           |  |----mark_unknown--> unresolved     (next claim takes it over)
                           |  |----release-------> absent, or back to unresolved if an
                           |  |                    earlier holder's outcome is still unknown
                           |  '----lock TTL passes-> unresolved   (holder presumed dead)
                           '------ any other claim: InFlight (409) or Mismatch (422)

An unresolved key is never free again until its TTL: a request whose outcome was lost may
have charged the customer, so the retry must go back to the gateway that saw it last (the
only one that can dedupe it), not to whichever gateway is healthiest now.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal, Protocol

from proxy.headers import HOP_BY_HOP

logger = logging.getLogger(__name__)


UnresolvedCause = Literal["unknown", "lock_expired"]


@dataclass(frozen=True, slots=True, kw_only=True)
class StoredResponse:
    """A definitive gateway answer kept so a retry with the same key gets it byte for byte."""

    status: int
    headers: tuple[tuple[str, str], ...]  # end-to-end only, in the order received
    body: bytes
    gateway: str
    transaction_id: str

    def __post_init__(self) -> None:
        if not 100 <= self.status <= 599:
            raise ValueError(f"status {self.status} is not an HTTP status")

    @property
    def size(self) -> int:
        """Bytes this response costs a store, for the in-memory byte budget."""
        return len(self.body) + sum(len(name) + len(value) for name, value in self.headers)


@dataclass(frozen=True, slots=True, kw_only=True)
class Claimed:
    """The key was free; the caller owns it and must complete, mark_unknown or release it."""

    lease: str


@dataclass(frozen=True, slots=True, kw_only=True)
class InFlight:
    """Another request holds the key now (409). It may be presumed dead after `retry_after`."""

    retry_after: float  # seconds until the holder's lock expires


@dataclass(frozen=True, slots=True, kw_only=True)
class Completed:
    """The key finished with a definitive answer for this same request: replay it."""

    response: StoredResponse


@dataclass(frozen=True, slots=True, kw_only=True)
class Mismatch:
    """The key was used for a different request (422); nothing is sent."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Unresolved:
    """An earlier holder's outcome is unknown; the caller now owns the key (like `Claimed`).

    `last_gateway` is the gateway the earlier holder last sent to, the one a retry must go
    to. It is None only when the holder was lost before it recorded any attempt, in which
    case nothing is known about where (or whether) the payment went.
    """

    lease: str
    cause: UnresolvedCause  # "unknown": mark_unknown; "lock_expired": the holder vanished
    last_gateway: str | None
    attempt_id: str | None
    transaction_id: str | None
    unresolved_count: int  # holders so far that ended without a definitive answer


ClaimResult = Claimed | InFlight | Completed | Mismatch | Unresolved


class StoreFull(Exception):
    """A store bounded in memory cannot take a new key now without forgetting one it must
    keep; the request is refused (503) rather than sent without its protection."""

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class IdempotencyStore(Protocol):
    """Claims on idempotency keys. Every write after `claim` is a compare-and-set on the lease:
    a holder whose lock expired and was taken over gets False and changes nothing."""

    async def claim(
        self, key: str, fingerprint: str, ttl: float, *, lock_ttl: float | None = None
    ) -> ClaimResult:
        """Atomically look the key up and, when it is free or unresolved, take it.

        `ttl` is how long the key is remembered from now; `lock_ttl` how long the claim may
        stay in flight before its holder is presumed dead (None: the store's default). It
        should exceed the route's total timeout.
        """
        ...

    async def record_attempt(
        self,
        key: str,
        lease: str,
        *,
        gateway: str,
        attempt_id: str,
        transaction_id: str | None = None,
    ) -> bool:
        """Note, before sending, which gateway this holder is about to try, so a holder that
        dies mid-attempt still leaves `Unresolved.last_gateway` behind."""
        ...

    async def complete(self, key: str, lease: str, response: StoredResponse, ttl: float) -> bool:
        """Store a definitive answer for replay for `ttl` seconds and end the claim."""
        ...

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
        """End the claim with a lost outcome; the next claim gets `Unresolved`."""
        ...

    async def release(self, key: str, lease: str) -> bool:
        """End the claim when nothing was sent anywhere, so the client may simply retry."""
        ...

    async def ping(self) -> None:
        """Raise unless the store answers now (used to notice it is back after an outage)."""
        ...

    async def close(self) -> None:
        """Give back what the store holds (connections); the store is unusable afterwards."""
        ...


def new_lease() -> str:
    """An unguessable token naming one holder of one claim."""
    return secrets.token_hex(16)


def check_ttl(name: str, seconds: float) -> float:
    """`seconds` if it is a usable TTL, else ValueError naming it."""
    if not (math.isfinite(seconds) and seconds > 0):
        raise ValueError(f"{name} must be a positive number of seconds, not {seconds!r}")
    return seconds


def end_to_end_headers(headers: Iterable[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """`headers` without hop-by-hop fields, including any the Connection field names: a
    replay travels on another connection and must not repeat them."""
    pairs = tuple(headers)
    named: set[str] = set()
    for name, value in pairs:
        if name.lower() == "connection":
            named.update(token.strip().lower() for token in value.split(",") if token.strip())
    drop = HOP_BY_HOP | named
    return tuple((name, value) for name, value in pairs if name.lower() not in drop)
