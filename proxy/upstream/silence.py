"""Whether a gateway has gone silent: requests waiting on it and nothing answered.

Owns: `Silence`, the start times of one gateway's requests in flight, and its verdict: at
least `MIN_WAITING` requests in flight, the oldest waiting longer than
max(`MIN_OVERDUE`, `FACTOR` x the gateway's usual latency), and nothing answered since it
was sent. That is how a gateway that takes payments and hangs looks well before the first
per-try timeout fires. A silent gateway is passed over while another can take the request
(the balancer reads `GatewayState.silent`); it is not ejected — its timeouts do that.
Must not: read the clock (callers pass `now`), or keep a gateway out on its own: a finish
that was never reported leaves an old start behind, and an old start only ever turns the
verdict off (the gateway has answered since).
"""

from __future__ import annotations

import bisect

#: Requests in flight before silence means anything: one slow request is just slow.
MIN_WAITING = 3
#: The oldest must wait this many times the gateway's usual latency...
FACTOR = 5.0
#: ...and at least this long, so a gateway answering in a millisecond is not judged on
#: scheduler noise.
MIN_OVERDUE = 0.05
#: A finish matches the start it reports when the two agree within this.
MATCH_WITHIN = 0.01
#: Bound on the starts kept, should finishes go unreported.
MAX_TRACKED = 10_000


class Silence:
    """Start times of one gateway's requests in flight, oldest first."""

    __slots__ = ("_starts",)

    def __init__(self) -> None:
        self._starts: list[float] = []

    def __len__(self) -> int:
        return len(self._starts)

    def started(self, now: float) -> None:
        starts = self._starts
        if starts and now < starts[-1]:
            bisect.insort(starts, now)
        else:
            starts.append(now)
        excess = len(starts) - MAX_TRACKED
        if excess > 0:
            del starts[:excess]

    def finished(self, start: float) -> None:
        """The request started at `start` (as its caller measured it) is over."""
        starts = self._starts
        i = bisect.bisect_left(starts, start)
        # The nearer of the neighbours either side of `start`, the earlier on a tie
        # (starts[i] >= start > starts[i - 1], so no abs() is needed).
        if i < len(starts):
            best, gap = i, starts[i] - start
            if i and start - starts[i - 1] <= gap:
                best, gap = i - 1, start - starts[i - 1]
        elif i:
            best, gap = i - 1, start - starts[i - 1]
        else:
            return
        if gap <= MATCH_WITHIN:
            del starts[best]

    def silent(self, now: float, last_answer: float, usual: float | None) -> bool:
        """Whether the gateway has gone silent; `last_answer`: when it last answered
        anything, `usual`: its usual latency (None: not known yet, so never silent)."""
        starts = self._starts
        if len(starts) < MIN_WAITING or usual is None:
            return False
        oldest = starts[0]
        return last_answer < oldest and now - oldest > max(MIN_OVERDUE, FACTOR * usual)
