"""Concrete choice: which gateway takes the next attempt of a request.

Owns: `Balancer.pick`, synchronous and free of I/O: region order first, then smooth
weighted round robin (nginx's algorithm) or power-of-two-choices over peak-EWMA latency
within a region (an idle gateway's latency fades toward zero, so one passed over after a
slow spell is tried again: nothing else would ever update it), over gateways that are
eligible, allowed and not yet tried; a gateway whose
half-open probe is due is picked first, so the probe does not wait its turn, and a silent
one (requests waiting on it, none answered) only when no other gateway of the region can.
Must not: change health flags or send anything. SWRR positions are kept per
(route, region, gateway) and survive reloads.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from proxy.config.model import Gateway
from proxy.routing import RoutePlan
from proxy.upstream.degradation import decay
from proxy.upstream.state import DRAINING_BIT, GatewayState, StateRegistry

Admit = Callable[[GatewayState], str | None]


@dataclass(slots=True)
class Skip:
    gateway: str
    reason: str


class Balancer:
    def __init__(self, states: StateRegistry, *, rng: random.Random | None = None) -> None:
        self.states = states
        self._current: dict[tuple[str, str], dict[str, float]] = {}
        self._rng = rng or random.Random()

    def pick(
        self,
        plan: RoutePlan,
        region: str,
        admit: Admit,
        exclude: frozenset[str] | set[str] = frozenset(),
        allow: Callable[[Gateway], bool] | None = None,
        skipped: list[Skip] | None = None,
        states: Mapping[str, GatewayState] | None = None,
        now: float | None = None,
    ) -> GatewayState | None:
        """The gateway for the next attempt, or None when nothing is eligible anywhere.

        `skipped` collects each gateway that was passed over and why, for the error body.
        `now` (the clock the answers' latencies were folded at) lets least-latency fade the
        latency of a gateway that has taken no answer for a while; None: no fading.
        """
        order = plan.region_order.get(region) or plan.region_order[plan.route.region.default]
        lookup = states if states is not None else self.states
        last_resort: tuple[str, list[GatewayState]] | None = None
        for reg in order:
            eligible: list[GatewayState] = []
            quiet: list[GatewayState] = []
            for gw in plan.by_region[reg]:
                if gw.name in exclude:
                    continue
                st = lookup.get(gw.name)
                if st is None:
                    continue
                if allow is not None and not allow(gw):
                    if skipped is not None:
                        skipped.append(Skip(gw.name, "other-provider"))
                    continue
                reason = admit(st)
                if reason is not None:
                    if skipped is not None:
                        skipped.append(Skip(gw.name, reason))
                    continue
                if st.probe_due:
                    return st  # its half-open probe goes out now, not when SWRR gets to it
                if st.silent:
                    quiet.append(st)
                    continue
                eligible.append(st)
            if quiet:
                if not eligible:
                    if last_resort is None:
                        last_resort = (reg, quiet)
                    continue  # a fallback region may answer; silent beats nothing, below
                if skipped is not None:
                    skipped.extend(Skip(st.name, "silent") for st in quiet)
            if eligible:
                if len(eligible) == 1:
                    return eligible[0]
                if plan.route.balancing == "least-latency":
                    return self._p2c(eligible, now)
                return self._swrr(plan.name, reg, eligible)
        if last_resort is not None:
            reg, quiet = last_resort
            return quiet[0] if len(quiet) == 1 else self._swrr(plan.name, reg, quiet)
        if plan.route.panic:
            return self._panic(plan, order, exclude, allow, lookup)
        return None

    def _swrr(self, route: str, region: str, eligible: list[GatewayState]) -> GatewayState:
        current = self._current.get((route, region))
        if current is None:
            current = self._current[(route, region)] = {}
        total = 0.0
        best: GatewayState | None = None
        best_cw = 0.0
        for st in eligible:
            w = st.effective_weight()
            total += w
            cw = current.get(st.name, 0.0) + w
            current[st.name] = cw
            if best is None or cw > best_cw:
                best, best_cw = st, cw
        assert best is not None
        current[best.name] = best_cw - total
        return best

    def _p2c(self, eligible: list[GatewayState], now: float | None) -> GatewayState:
        a, b = self._rng.sample(eligible, 2)
        return a if _load(a, now) <= _load(b, now) else b

    def _panic(
        self,
        plan: RoutePlan,
        order: tuple[str, ...],
        exclude: frozenset[str] | set[str],
        allow: Callable[[Gateway], bool] | None,
        lookup: Mapping[str, GatewayState] | StateRegistry,
    ) -> GatewayState | None:
        """Opted-in last resort: any gateway not drained, tried or disallowed."""
        for reg in order:
            pool = [
                st
                for gw in plan.by_region[reg]
                if gw.name not in exclude
                and (allow is None or allow(gw))
                and (st := lookup.get(gw.name)) is not None
                and not st.bits & DRAINING_BIT
            ]
            if pool:
                return self._rng.choice(pool)
        return None

    def forget(self, route: str) -> None:
        """Drop SWRR positions of a route that no longer exists."""
        for key in [k for k in self._current if k[0] == route]:
            del self._current[key]


def _load(st: GatewayState, now: float | None) -> float:
    """Peak-EWMA cost: expected latency times queue depth, shared out by weight.

    While nothing is in flight on the gateway, its latency fades toward zero from its last
    answer on, with its short window as the time constant. Without that, a gateway that
    was slow once (a stall of this host, a spike) and then lost every comparison would keep
    that latency, and its low score, for good: both change only when it answers. With
    requests in flight it does not fade: their answers are still to come, and a gateway
    that holds them without answering must not look faster for it.
    """
    latency = st.ewma_latency or 0.001
    if now is not None and not st.in_flight:
        kept = decay(st.ewma_at, now, st.gateway.degradation.short_window)
        if kept is not None:
            latency *= kept
    return latency * (st.in_flight + 1) / max(st.effective_weight(), 1e-6)
