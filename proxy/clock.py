"""The clock every piece of timing logic takes, so tests move time instead of sleeping.

Owns: the `Clock` protocol, the real monotonic clock and a manual clock for tests, and
`iso_millis`, the one form a time takes in log lines and events.
Must not: sleep or schedule anything; callers decide what to do with the time.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Final


class Clock:
    """What every clock gives. A base class rather than a protocol: the compiled build
    then calls `now()` through its method table, not as a Python attribute call (a few
    times per request)."""

    __slots__ = ()

    def now(self) -> float:
        """Monotonic seconds; only differences between two readings mean anything."""
        raise NotImplementedError

    def wall(self) -> float:
        """Seconds since the epoch, for timestamps shown to people."""
        raise NotImplementedError


#: The clock functions, bound once: compiled, a `Final` name is a C static, while
#: `time.monotonic` is an attribute looked up on the module at every call. The request
#: path calls these directly where it reads the process's own clock.
monotonic: Final = time.monotonic
wall_time: Final = time.time


class MonotonicClock(Clock):
    __slots__ = ()

    def now(self) -> float:
        return monotonic()

    def wall(self) -> float:
        return wall_time()


class ManualClock(Clock):
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


class _Second:
    """The last whole second formatted, and its text (one per process)."""

    __slots__ = ("cached",)

    def __init__(self) -> None:
        self.cached: tuple[int, str] = (-1, "")


_SECOND: Final = _Second()
#: ".000Z" to ".999Z": a list index instead of a number format, three times per request.
_MILLIS: Final = tuple(f".{ms:03d}Z" for ms in range(1000))


def iso_millis(ts: float) -> str:
    """`ts` as RFC 3339 UTC with milliseconds (`2026-11-30T21:08:04.123Z`).

    The seconds part is formatted once per second (lines come in bursts within one); one
    tuple assignment keeps it consistent across threads.
    """
    whole = int(ts)
    cached = _SECOND.cached
    if cached[0] != whole:
        cached = (whole, datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S"))
        _SECOND.cached = cached
    ms = int((ts - whole) * 1000)
    return cached[1] + (_MILLIS[ms] if 0 <= ms < 1000 else f".{ms:03d}Z")
