"""Rolling one- and five-minute views of traffic, and when each gateway's state began.

Owns: `Windows`, which samples the request metrics and the gateways' counters once a
second (a background task, never the request path) into a five-minute ring, and answers
per route: request rate, success rate (not 5xx, as Linkerd counts it) and p50/p99
interpolated from the latency histogram exactly as PromQL's `histogram_quantile` does;
per gateway: its status with since when and why, and requests and failures over each
window. It also listens to flag changes to know the "since" and the reason.
Must not: change any state, or count anything the metrics do not: every number it shows
can be recomputed from `/metrics`.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

from proxy import errors
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.metrics import BUCKETS, Metrics
from proxy.upstream.state import Flag, FlagChange, GatewayState

logger = logging.getLogger(__name__)

WINDOWS = (("1m", 60.0), ("5m", 300.0))
SAMPLE_EVERY = 1.0
#: Most severe first: the first flag set is the gateway's status (the page uses the same order).
STATUS_ORDER = (Flag.ACTIVE_FAILED, Flag.EJECTED, Flag.DRAINING, Flag.THROTTLED, Flag.DEGRADED)
#: What `payswitch_gateway_up` counts as down.
DOWN = Flag.ACTIVE_FAILED | Flag.EJECTED


def _error_statuses() -> dict[str, int]:
    found: dict[str, int] = {}
    pending: list[type[errors.ProxyError]] = [errors.ProxyError]
    while pending:
        cls = pending.pop()
        found[cls.slug] = cls.status
        pending.extend(cls.__subclasses__())
    return found


_ERROR_STATUS = _error_statuses()


def is_failure(outcome: str) -> bool:
    """A request outcome label that counts against the success rate: a 5xx answer, or a
    proxy error answered with one (an unknown label counts as a failure)."""
    if len(outcome) == 3 and outcome.endswith("xx"):
        return outcome[0] == "5"
    return _ERROR_STATUS.get(outcome, 500) >= 500


def quantile(q: float, buckets: Iterable[int]) -> float | None:
    """`histogram_quantile(q, ...)` over per-bucket (not cumulative) counts, in seconds."""
    counts = list(buckets)
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    running = 0
    for i, n in enumerate(counts):
        if running + n >= rank and n > 0:
            if i == len(BUCKETS):
                return BUCKETS[-1]  # in +Inf: the highest finite bound, as Prometheus does
            lower = 0.0 if i == 0 else BUCKETS[i - 1]
            return lower + (BUCKETS[i] - lower) * (rank - running) / n
        running += n
    return BUCKETS[-1]


@dataclass(slots=True)
class _Route:
    total: int = 0
    failures: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(BUCKETS) + 1))


@dataclass(frozen=True, slots=True)
class _Sample:
    at: float  # monotonic seconds
    routes: dict[str, _Route]
    gateways: dict[str, tuple[int, int]]  # requests, failures


@dataclass(slots=True)
class _Since:
    flags: dict[Flag, tuple[float, str]] = field(default_factory=dict)  # set at, reason
    cleared_at: float = 0.0
    cleared_reason: str = "added"


class Windows:
    def __init__(
        self, metrics: Metrics, states: Iterable[GatewayState], *, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        self._metrics = metrics
        self._states = states  # iterated afresh each time: a StateRegistry follows reloads
        self._clock = clock
        self._ring: deque[_Sample] = deque(maxlen=int(WINDOWS[-1][1] / SAMPLE_EVERY) + 2)
        self._since: dict[str, _Since] = {}

    # -- gateway state changes ---------------------------------------------------------

    def attach(self, st: GatewayState) -> None:
        """Follow `st`'s flag changes (StateRegistry's on_create hook)."""
        since = self._since[st.name] = _Since(cleared_at=self._clock.wall())
        for flag in STATUS_ORDER:
            if st.flags & flag:
                since.flags[flag] = (since.cleared_at, "set before it was followed")
        st.subscribe(self._on_flag)

    def _on_flag(self, st: GatewayState, change: FlagChange) -> None:
        since = self._since.setdefault(st.name, _Since())
        now = self._clock.wall()
        if change.set:
            since.flags[change.flag] = (now, change.reason)
        else:
            since.flags.pop(change.flag, None)
            since.cleared_at, since.cleared_reason = now, change.reason

    # -- sampling ------------------------------------------------------------------------

    def _read(self) -> _Sample:
        routes: dict[str, _Route] = {}
        for route, outcome, count, buckets in self._metrics.request_counts():
            r = routes.get(route)
            if r is None:
                r = routes[route] = _Route()
            r.total += count
            if is_failure(outcome):
                r.failures += count
            for i, n in enumerate(buckets):
                r.buckets[i] += n
        gateways = {st.name: (st.requests, st.failures) for st in self._states}
        return _Sample(self._clock.now(), routes, gateways)

    def sample(self) -> None:
        self._ring.append(self._read())

    async def run(self) -> None:
        while True:
            try:
                self.sample()
            except Exception:
                logger.exception("dashboard window sample failed")
            await asyncio.sleep(SAMPLE_EVERY)

    def _bases(self, now: float) -> Iterator[tuple[str, _Sample | None]]:
        for name, seconds in WINDOWS:
            base = next((s for s in self._ring if s.at >= now - seconds - 0.5), None)
            yield name, base

    # -- the view --------------------------------------------------------------------------

    def view(self) -> dict[str, object]:
        """What the dashboard shows, computed from a fresh reading and the ring."""
        cur = self._read()
        bases = dict(self._bases(cur.at))
        routes = []
        for route in sorted(cur.routes):
            entry: dict[str, object] = {"route": route}
            for name, base in bases.items():
                entry[name] = _route_window(cur, base, route)
            routes.append(entry)
        gateways = []
        up = eligible = 0
        for st in self._states:
            g = self._gateway(st, cur, bases)
            up += bool(g["up"])
            eligible += bool(g["eligible"])
            gateways.append(g)
        return {
            "routes": routes,
            "gateways": gateways,
            "up": up,
            "eligible": eligible,
            "total": len(gateways),
            "at": self._clock.wall(),
        }

    def _gateway(
        self, st: GatewayState, cur: _Sample, bases: dict[str, _Sample | None]
    ) -> dict[str, object]:
        since = self._since.get(st.name) or _Since()
        status, at, reason = "up", since.cleared_at, since.cleared_reason
        for flag in STATUS_ORDER:
            if st.flags & flag and flag.name:
                status = flag.name.lower()
                at, reason = since.flags.get(flag, (since.cleared_at, ""))
                break
        g: dict[str, object] = {
            "name": st.name,
            "status": status,
            "since": at,
            "reason": reason,
            "up": not st.flags & DOWN,
            "eligible": not st.blocked,
        }
        requests, failures = cur.gateways.get(st.name, (0, 0))
        for name, base in bases.items():
            b = base.gateways.get(st.name, (0, 0)) if base is not None else (0, 0)
            # A counter below its base belongs to a gateway recreated by a reload.
            dr = requests - b[0] if requests >= b[0] else requests
            df = failures - b[1] if failures >= b[1] else failures
            g[name] = {"requests": dr, "failures": df}
        return g


def _route_window(cur: _Sample, base: _Sample | None, route: str) -> dict[str, object]:
    now = cur.routes[route]
    was = base.routes.get(route) if base is not None else None
    seconds = cur.at - base.at if base is not None else 0.0
    total = now.total - (was.total if was else 0)
    failures = now.failures - (was.failures if was else 0)
    buckets = [n - (was.buckets[i] if was else 0) for i, n in enumerate(now.buckets)]
    p50, p99 = quantile(0.5, buckets), quantile(0.99, buckets)
    return {
        "requests": total,
        "seconds": round(seconds, 3),
        # At least one sample period: a window that began a moment ago is not a burst.
        "rate": round(total / max(seconds, SAMPLE_EVERY), 3) if base is not None else None,
        "success_rate": round(1 - failures / total, 5) if total else None,
        "p50_ms": round(p50 * 1000, 3) if p50 is not None else None,
        "p99_ms": round(p99 * 1000, 3) if p99 is not None else None,
    }
