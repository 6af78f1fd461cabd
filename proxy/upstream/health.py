"""The health façade the request path talks to: admission, attempt start and end.

Owns: `Health`, which wires every health source of a gateway (limits, passive outlier
detection, predictive degradation, active checks) to its `GatewayState`, keeps them across
reloads for unchanged gateways, enforces the cap on how many gateways may be ejected at
once (and the one exception to it: a failure proven by a run of consecutive failures while
a peer serves well), owns the operator's DRAINING flag and exports health metrics.
Must not: pick gateways or speak HTTP to clients. The balancer asks `admit()` whether a
gateway may take a request and calls `started()` only for the one it sends to, so merely
looking at a gateway costs nothing (no rate token, no half-open probe slot).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import random
from collections.abc import Iterable, Sequence
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.model import Gateway, Route
from proxy.events import Emitter, NullEmitter, Severity
from proxy.upstream.active import ActiveChecker, Sleep
from proxy.upstream.client import UpstreamClient
from proxy.upstream.degradation import DegradationTracker, exploration_floor
from proxy.upstream.limits import GatewayLimiter
from proxy.upstream.outlier import OutlierDetector
from proxy.upstream.silence import Silence
from proxy.upstream.state import (
    DRAINING_BIT,
    Flag,
    FlagChange,
    GatewayState,
    Outcome,
    StateRegistry,
)

logger = logging.getLogger(__name__)

#: A gateway is "up" for the metric unless a health source took it out; draining and
#: throttling are not outages and must not page anyone.
_DOWN = Flag.ACTIVE_FAILED | Flag.EJECTED
_SOURCE_OF = {Flag.EJECTED: "passive", Flag.ACTIVE_FAILED: "active"}


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.score = Gauge(
            "payswitch_gateway_health_score",
            "Predictive health score multiplied into the gateway's weight (0-1]",
            ["gateway"],
            registry=registry,
        )
        self.up = Gauge(
            "payswitch_gateway_up",
            "1 unless active checks or outlier detection took the gateway out",
            ["gateway"],
            registry=registry,
        )
        self.ejections = Counter(
            "payswitch_gateway_ejections_total",
            "Times a gateway was taken out, by the health source that did it",
            ["gateway", "source"],
            registry=registry,
        )
        self.spillovers = Counter(
            "payswitch_gateway_spillovers_total",
            "Requests sent elsewhere because this gateway refused admission, by reason",
            ["gateway", "reason"],
            registry=registry,
        )

    def forget(self, name: str) -> None:
        for gauge in (self.score, self.up):
            with contextlib.suppress(KeyError):
                gauge.remove(name)


_OUT_BITS: Final = int(Flag.DRAINING | Flag.ACTIVE_FAILED)
#: A peer under any of these carries no traffic, so it proves nothing about a fault.
_OUT_OF_SERVICE = Flag.DRAINING | Flag.ACTIVE_FAILED | Flag.EJECTED


@dataclasses.dataclass(slots=True)
class _Sources:
    """Every health source of one gateway, alive as long as its `GatewayState`."""

    st: GatewayState
    limiter: GatewayLimiter
    outlier: OutlierDetector
    degradation: DegradationTracker
    active: ActiveChecker | None = None
    silence: Silence = dataclasses.field(default_factory=Silence)
    reported_score: float = -1.0  # last score written to the gauge, to skip unchanged writes


class Health:
    """Per-gateway health sources behind the four calls the request path makes."""

    def __init__(
        self,
        states: StateRegistry,
        /,
        *,
        clock: Clock = SYSTEM_CLOCK,
        events: Emitter | None = None,
        registry: CollectorRegistry | None = None,
        routes: Sequence[Route] = (),
        max_ejected_percent: float = 50.0,
        http: UpstreamClient | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.states = states
        self.clock = clock
        self.events: Emitter = events or NullEmitter()
        self._metrics = _Metrics(registry) if registry is not None else None
        self._routes: tuple[Route, ...] = tuple(routes)
        #: Cap for gateways in no known route (no routes given): over the whole registry.
        self.max_ejected_percent = max_ejected_percent
        self._http = http
        self._owns_http = False
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._sources: dict[str, _Sources] = {}
        self._floors: dict[str, tuple[tuple[Route, ...], Gateway, float]] = {}
        self._started = False
        for st in states.values():
            self._ensure(st)
        self._sync_active()

    # -- request path ----------------------------------------------------------------

    def _live(self, st: GatewayState) -> _Sources | None:
        """`st`'s health sources, or None when a reload retired `st` (removed, or its
        address changed): requests still running on the old rules may finish with it, but
        it must not grow health sources, tasks or metric series again."""
        src = self._sources.get(st.name)
        if src is not None and src.st is st:
            return src
        if self.states.get(st.name) is not st:
            return None
        return self._ensure(st)

    def admit(self, st: GatewayState, now: float) -> str | None:
        """None when `st` may take a request now, else the reason it may not. Takes nothing."""
        src = self._live(st)
        if src is None:
            return "draining" if st.bits & DRAINING_BIT else None
        reason = self._refusal(src, now)
        if reason is None:
            st.silent = src.silence.silent(
                now, src.outlier.last_answer, src.degradation.usual_latency
            )
        elif self._metrics is not None:
            self._metrics.spillovers.labels(st.name, reason).inc()
        return reason

    def _refusal(self, src: _Sources, now: float) -> str | None:
        bits = src.st.bits
        if bits & _OUT_BITS:
            return "draining" if bits & DRAINING_BIT else "active-failed"
        return (
            src.outlier.admit(now)
            or src.limiter.check_throttle(now)
            or src.limiter.check_capacity(now)
        )

    def started(self, st: GatewayState, now: float) -> None:
        """The balancer chose `st` and the request is being sent to it."""
        st.in_flight += 1
        st.requests += 1
        src = self._live(st)
        if src is None:
            return
        src.limiter.take(now)
        src.outlier.started(now)
        src.silence.started(now)

    def finished(
        self,
        st: GatewayState,
        outcome: Outcome,
        latency: float,
        now: float,
        retry_after: float | None = None,
    ) -> None:
        """An attempt started with `started()` ended; `latency` is its duration in seconds."""
        st.in_flight = max(0, st.in_flight - 1)
        if outcome is Outcome.LOCAL:
            # payswitch's own shortage says nothing about the gateway: no verdict, as when
            # we gave up on an attempt (a half-open probe is then free to go again).
            outcome = Outcome.CANCELLED
        if outcome.is_failure:
            st.failures += 1
        src = self._live(st)
        if src is None:
            return
        if outcome is Outcome.THROTTLED:
            src.limiter.throttle(retry_after, now)
        src.silence.finished(now - latency)
        src.outlier.finished(outcome, latency, now)
        if src.outlier.predates_return(latency, now):
            return  # a straggler from before its outage must not drag the fresh averages
        src.degradation.observe(outcome, latency, now, self._floor(st))
        # The gauge moves in steps of 0.01: writing every tiny drift costs a locked update
        # per request for nothing a dashboard shows.
        if self._metrics is not None and abs(st.score - src.reported_score) >= 0.01:
            src.reported_score = st.score
            self._metrics.score.labels(st.name).set(st.score)

    # -- operator --------------------------------------------------------------------

    def drain(self, st: GatewayState, reason: str = "operator") -> bool:
        """Stop sending new requests to `st`; in-flight ones finish. False if already so."""
        if st.flags & Flag.DRAINING:
            return False
        st.set_flag(Flag.DRAINING, reason)
        logger.info("%s drained: %s", st.name, reason)
        self.events.emit("gateway.drained", Severity.INFO, gateway=st.name)
        return True

    def undrain(self, st: GatewayState, reason: str = "operator") -> bool:
        if not st.flags & Flag.DRAINING:
            return False
        st.clear_flag(Flag.DRAINING, reason)
        logger.info("%s undrained: %s", st.name, reason)
        self.events.emit("gateway.undrained", Severity.INFO, gateway=st.name)
        return True

    def describe(self, st: GatewayState) -> dict[str, object]:
        """Limit and health-source state of `st` for the admin API."""
        src = self._ensure(st)
        now = self.clock.now()
        src.outlier.refresh_weight(now)
        return {
            "limits": _plain(dataclasses.asdict(src.limiter.status(now))),
            "outlier": _plain(dataclasses.asdict(src.outlier.status(now))),
            "degradation": _plain(dataclasses.asdict(src.degradation.status(now))),
            "active": None
            if src.active is None
            else _plain(dataclasses.asdict(src.active.status())),
        }

    # -- lifecycle -------------------------------------------------------------------

    def reconcile(
        self,
        created: list[GatewayState],
        removed: list[GatewayState],
        routes: Sequence[Route] | None = None,
    ) -> None:
        """Start what new gateways need (active checks), stop what removed ones had.

        `routes` (the new snapshot's) scope the ejection cap and the exploration floor to
        the gateways a route really balances between; None keeps the previous ones.
        """
        if routes is not None:
            self._routes = tuple(routes)
        self._floors.clear()
        for st in removed:
            src = self._sources.get(st.name)
            if src is None or src.st is not st:
                continue
            del self._sources[st.name]
            if src.active is not None:
                src.active.cancel()
            if self._metrics is not None:
                self._metrics.forget(st.name)
        for st in created:
            self._ensure(st)
        self._sync_active()

    async def start(self) -> None:
        """Start active checks; they need a running loop and an HTTP session."""
        if self._started:
            return
        if self._http is None:
            # Probes keep connections of their own: a probe never takes a pooled traffic
            # connection, and never counts against the gateway's cap as traffic does.
            self._http = UpstreamClient(idle_timeout=30.0, max_idle=2)
            self._owns_http = True
        self._started = True
        self._sync_active()

    async def close(self) -> None:
        self._started = False
        await asyncio.gather(
            *(src.active.stop() for src in self._sources.values() if src.active is not None)
        )
        if self._owns_http and self._http is not None:
            await self._http.close()
            self._http = None
            self._owns_http = False

    # -- wiring ----------------------------------------------------------------------

    def _ensure(self, st: GatewayState) -> _Sources:
        src = self._sources.get(st.name)
        if src is not None and src.st is st:
            return src
        now = self.clock.now()
        self._floors.clear()  # a new gateway among the peers of those in no route
        degradation = DegradationTracker(st, self.events)
        src = _Sources(
            st=st,
            limiter=GatewayLimiter(st, self.events, now),
            outlier=OutlierDetector(
                st, self.events, self._may_eject, now, on_return=degradation.reset
            ),
            degradation=degradation,
        )
        self._sources[st.name] = src
        st.subscribe(self._on_flag)
        if self._metrics is not None:
            self._metrics.score.labels(st.name).set(st.score)
            self._metrics.up.labels(st.name).set(0 if st.flags & _DOWN else 1)
        return src

    def _sync_active(self) -> None:
        """Give every gateway with a health check a running checker, and only those."""
        for src in self._sources.values():
            st = src.st
            if st.gateway.health_check is None:
                if src.active is not None:
                    src.active.cancel()
                    src.active = None
                    st.clear_flag(Flag.ACTIVE_FAILED, "health check removed")
                continue
            if src.active is None:
                src.active = ActiveChecker(
                    st,
                    clock=self.clock,
                    events=self.events,
                    on_restored=self._on_active_restored,
                    on_result=self._on_active_result,
                    sleep=self._sleep,
                    rng=self._rng,
                )
            if self._started and self._http is not None:
                src.active.start(self._http)

    def _on_active_restored(self, st: GatewayState) -> None:
        """Active checks saw it fail and come back: a passive ejection still running ends
        now (the half-open probe still decides), and it starts over on fresh averages."""
        src = self._sources.get(st.name)
        if src is None or src.st is not st:
            return
        now = self.clock.now()
        src.outlier.end_ejection(now, "active health checks pass again")
        src.outlier.start_slow_start(now)
        src.degradation.reset(now)

    def _on_active_result(self, st: GatewayState, ok: bool) -> None:
        src = self._sources.get(st.name)
        if src is not None and src.st is st:
            src.outlier.active_result(ok)

    def _on_flag(self, st: GatewayState, change: FlagChange) -> None:
        if self._metrics is None:
            return
        self._metrics.up.labels(st.name).set(0 if st.flags & _DOWN else 1)
        source = _SOURCE_OF.get(change.flag)
        if change.set and source is not None:
            self._metrics.ejections.labels(st.name, source).inc()

    def _peer_groups(self, st: GatewayState) -> list[tuple[Iterable[str], float]]:
        groups: list[tuple[Iterable[str], float]] = [
            (r.gateways, r.max_ejected_percent) for r in self._routes if st.name in r.gateways
        ]
        if not groups:
            groups.append(([s.name for s in self.states.values()], self.max_ejected_percent))
        return groups

    def _may_eject(self, st: GatewayState, since: float | None) -> bool:
        """Whether `st` may be ejected: in every route it serves, either the route stays
        within its ejection cap, or the failure is proven (`since`: when the first request of
        its run of consecutive failures was sent) and a peer in service has succeeded since.

        The cap guards against weak evidence (a failure percentage, a fault on our side
        that every gateway shares); it must not keep a gateway that failed every request
        in a row in rotation while another one serves. The exception never ejects the
        last gateway of a route (it needs a peer in service), so below a 100% cap outlier
        detection alone never turns a route into a hard 503.
        """
        for names, cap in self._peer_groups(st):
            peers = [
                p for p in (self.states.get(n) for n in names) if p is not None and p is not st
            ]
            total = len(peers) + 1
            out = 1 + sum(1 for p in peers if p.flags & Flag.EJECTED)
            if out * 100 <= cap * total:
                continue
            if since is None or not any(self._serves_since(p, since) for p in peers):
                return False
        return True

    def _serves_since(self, st: GatewayState, since: float) -> bool:
        """Whether `st` is in service and a request to it succeeded at or after `since`."""
        if st.flags & _OUT_OF_SERVICE:
            return False
        src = self._sources.get(st.name)
        if src is None or src.st is not st:
            return False
        last = src.outlier.last_success
        return last is not None and last >= since

    def _floor(self, st: GatewayState) -> float:
        """`_exploration_floor`, worked out once per rules: it depends on the routes and
        the gateways' configured weights only, which change together on a reload (the
        cache is emptied then, and an entry made under older routes or an older
        definition of `st` is not used)."""
        cached = self._floors.get(st.name)
        if cached is not None and cached[0] is self._routes and cached[1] is st.gateway:
            return cached[2]
        floor = self._exploration_floor(st)
        self._floors[st.name] = (self._routes, st.gateway, floor)
        return floor

    def _exploration_floor(self, st: GatewayState) -> float:
        peers: set[str] = set()
        for names, _ in self._peer_groups(st):
            peers.update(names)
        peers.discard(st.name)
        weight = sum(p.gateway.weight for p in (self.states.get(n) for n in peers) if p)
        return exploration_floor(st.gateway.weight, weight, st.gateway.degradation.exploration)


def _plain(values: dict[str, object]) -> dict[str, object]:
    return {k: round(v, 4) if isinstance(v, float) else v for k, v in values.items()}
