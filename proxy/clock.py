"""The clock every piece of timing logic takes, so tests move time instead of sleeping.

Owns: the `Clock` protocol, the real monotonic clock and a manual clock for tests.
Must not: sleep or schedule anything; callers decide what to do with the time.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Monotonic seconds; only differences between two readings mean anything."""
        ...

    def wall(self) -> float:
        """Seconds since the epoch, for timestamps shown to people."""
        ...


class MonotonicClock:
    __slots__ = ()

    def now(self) -> float:
        return time.monotonic()

    def wall(self) -> float:
        return time.time()


class ManualClock:
    """A clock that only moves when told to."""

    __slots__ = ("_now", "_wall0")

    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._wall0 = 1_700_000_000.0 - start

    def now(self) -> float:
        return self._now

    def wall(self) -> float:
        return self._wall0 + self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError("a clock does not go back")
        self._now += seconds


SYSTEM_CLOCK = MonotonicClock()
