"""Local saturation limits of one gateway: rate bucket, in-flight cap and 429 back-off.

Owns: `TokenBucket` and `GatewayLimiter`, which answer "is this gateway over a limit right
now?" and own the THROTTLED flag (set on a 429, cleared once its Retry-After has passed).
Must not: count anything as a health failure (a gateway over its limit is healthy, it is
just full), queue requests (an over-limit gateway is skipped, the request spills to the
next one) or read the clock itself (every method takes `now`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from proxy.config.model import Limits
from proxy.events import Emitter, Severity
from proxy.upstream.state import THROTTLED_BIT, Flag, GatewayState

logger = logging.getLogger(__name__)

#: Back-off when a 429 carries no usable Retry-After.
DEFAULT_RETRY_AFTER = 1.0
#: A gateway asking for a longer pause is still retried after this long: a bogus header
#: must not take a gateway out for hours.
MAX_RETRY_AFTER = 60.0
#: Refill arithmetic on float seconds leaves 0.9999999 where 1 was earned.
_EPSILON = 1e-9


@dataclass(frozen=True, slots=True, kw_only=True)
class LimitStatus:
    """A snapshot of one gateway's limits for the admin API."""

    tokens: float | None
    rate: float | None
    burst: float | None
    in_flight: int
    max_in_flight: int | None
    throttled_for_s: float


class TokenBucket:
    """A bucket of `burst` tokens refilled at `rate` per second on the caller's clock."""

    __slots__ = ("_last", "_tokens", "burst", "rate")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        if rate <= 0 or burst <= 0:
            raise ValueError("a token bucket needs a positive rate and burst")
        self.rate = rate
        self.burst = burst
        self._tokens = burst
        self._last = now

    def _refill(self, now: float) -> None:
        # A clock read slightly out of order (two callers with their own `now`) must not
        # drain the bucket.
        if now > self._last:
            self._tokens = min(self.burst, self._tokens + (now - self._last) * self.rate)
            self._last = now

    def available(self, now: float) -> float:
        self._refill(now)
        return self._tokens

    def has_token(self, now: float) -> bool:
        return self.available(now) >= 1.0 - _EPSILON

    def take(self, now: float) -> bool:
        """Take one token; False (and nothing taken) when the bucket is empty."""
        self._refill(now)
        if self._tokens < 1.0 - _EPSILON:
            return False
        self._tokens = max(0.0, self._tokens - 1.0)
        return True

    def resized(self, rate: float, burst: float, now: float) -> TokenBucket:
        """The same bucket under new limits, keeping what is left (never above the burst)."""
        fresh = TokenBucket(rate, burst, now)
        fresh._tokens = min(burst, self.available(now))
        return fresh


def _burst(limits: Limits) -> float | None:
    if limits.rate is None:
        return None
    return float(limits.burst) if limits.burst is not None else max(1.0, limits.rate)


class GatewayLimiter:
    """Rate bucket, in-flight cap and 429 back-off of one gateway.

    Limits are read from `st.gateway` on every call so a reload that changes them takes
    effect without losing the tokens already spent.
    """

    __slots__ = ("_bucket", "_events", "_limits", "st")

    def __init__(self, st: GatewayState, events: Emitter, now: float) -> None:
        self.st = st
        self._events = events
        self._limits = st.gateway.limits
        self._bucket = self._new_bucket(self._limits, now)

    @staticmethod
    def _new_bucket(limits: Limits, now: float) -> TokenBucket | None:
        burst = _burst(limits)
        if limits.rate is None or burst is None:
            return None
        return TokenBucket(limits.rate, burst, now)

    def _sync(self, now: float) -> TokenBucket | None:
        limits = self.st.gateway.limits
        # Identity first: a frozen dataclass's `!=` runs interpreted, and a reload that
        # leaves the limits alone still builds a new (equal) value.
        if limits is not self._limits and limits != self._limits:
            burst = _burst(limits)
            if limits.rate is None or burst is None:
                self._bucket = None
            elif self._bucket is None:
                self._bucket = TokenBucket(limits.rate, burst, now)
            else:
                self._bucket = self._bucket.resized(limits.rate, burst, now)
            self._limits = limits
        return self._bucket

    def check_throttle(self, now: float) -> str | None:
        """ "throttled" while a 429's back-off lasts; clears the flag once it has passed."""
        st = self.st
        if not st.bits & THROTTLED_BIT:
            return None
        if now < st.throttled_until:
            return "throttled"
        st.clear_flag(Flag.THROTTLED, "retry-after elapsed")
        return None

    def check_capacity(self, now: float) -> str | None:
        """ "in-flight-cap" or "rate-limited" when the gateway is full; takes nothing."""
        cap = self.st.gateway.limits.max_in_flight
        if cap is not None and self.st.in_flight >= cap:
            return "in-flight-cap"
        bucket = self._sync(now)
        if bucket is not None and not bucket.has_token(now):
            return "rate-limited"
        return None

    def take(self, now: float) -> None:
        """Spend a token for a request that is really being sent."""
        bucket = self._sync(now)
        if bucket is not None and not bucket.take(now):
            # The caller sent without asking admit() first (a panic-mode send, say); the
            # request goes anyway, and the bucket is already empty.
            logger.debug("%s: request sent with an empty rate bucket", self.st.name)

    def throttle(self, retry_after: float | None, now: float) -> float:
        """Back off after a 429 for its Retry-After; returns the pause applied (seconds)."""
        pause = DEFAULT_RETRY_AFTER if retry_after is None else retry_after
        pause = min(max(pause, 0.0), MAX_RETRY_AFTER)
        if pause <= 0:
            return 0.0
        st = self.st
        until = now + pause
        backing_off = bool(st.flags & Flag.THROTTLED) and now < st.throttled_until
        if backing_off and st.throttled_until >= until:
            return st.throttled_until - now
        st.throttled_until = until
        st.set_flag(Flag.THROTTLED, f"429, retry after {pause:g}s")
        # One event per back-off, not one per 429 of the requests already in flight.
        if not backing_off:
            self._events.emit(
                "gateway.throttled", Severity.WARNING, gateway=st.name, retry_after_s=pause
            )
        return pause

    def status(self, now: float) -> LimitStatus:
        bucket = self._sync(now)
        throttled = (
            max(0.0, self.st.throttled_until - now) if self.st.flags & Flag.THROTTLED else 0.0
        )
        return LimitStatus(
            tokens=None if bucket is None else bucket.available(now),
            rate=None if bucket is None else bucket.rate,
            burst=None if bucket is None else bucket.burst,
            in_flight=self.st.in_flight,
            max_in_flight=self.st.gateway.limits.max_in_flight,
            throttled_for_s=throttled,
        )
