"""Predictive health of one gateway: a short window drifting away from its long baseline.

Owns: `DegradationTracker`, which keeps short and long time-decayed averages of latency and
of error rate, turns them into `GatewayState.score` (what the balancer multiplies into the
weight) and owns the DEGRADED flag; it also keeps `GatewayState.ewma_latency`, the
peak-sensitive latency the least-latency balancer ranks by.
Must not: make a gateway ineligible (DEGRADED only lowers its weight; ejection is the
outlier detector's job), read the clock (every method takes `now`) or let the score fall so
low that no traffic reaches the gateway to notice its recovery.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from proxy.config.model import Degradation
from proxy.events import Emitter, Severity
from proxy.upstream.state import DEGRADED_BIT, Flag, GatewayState, Outcome

logger = logging.getLogger(__name__)

#: DEGRADED is set below the first score and cleared only at the second, so a score
#: hovering around one threshold does not flap the flag and the events.
DEGRADE_BELOW = 0.8
RECOVER_AT = 0.95
#: Samples (and seconds of one short window) before a baseline means anything: the first
#: requests of a fresh gateway (cold connections, JIT-ed upstreams) are not drift.
WARMUP_SAMPLES = 20
#: Latencies are compared to a baseline of at least this much, so a few milliseconds of
#: jitter on a very fast gateway do not read as "twice as slow".
LATENCY_FLOOR = 0.005

#: Outcomes whose latency says how fast the gateway is. A refused connection is fast and a
#: reset is arbitrary; a timeout's latency is how long we waited, which is the point.
#: Compared by identity on the request path (an Enum hashes through Python code).
_SUCCESS, _SERVER_ERROR, _TIMEOUT = Outcome.SUCCESS, Outcome.SERVER_ERROR, Outcome.TIMEOUT


class DecayingMean:
    """Mean of samples weighted by exp(-age / tau).

    Kept as a decayed sum over a decayed weight rather than the textbook
    `x += alpha * (sample - x)` with alpha = 1 - exp(-dt / tau): the two agree at a
    steady rate, but this form gives samples arriving at the same instant equal weight
    (the textbook form would ignore all but the first) and has no bias toward its
    starting value, so a new gateway's mean is right from the first sample.
    """

    __slots__ = ("_last", "_sum", "_weight")

    def __init__(self) -> None:
        self._sum = 0.0
        self._weight = 0.0
        self._last: float | None = None

    def add(self, sample: float, now: float, tau: float) -> None:
        last = self._last
        self.fold(sample, now, decay(last, now, tau) if last is not None else None)

    def fold(self, sample: float, now: float, decay: float | None) -> None:
        """`add` with the decay since the last sample worked out by the caller (None: no
        time has passed), which a pair of means sampled together shares."""
        if decay is not None:
            self._sum *= decay
            self._weight *= decay
        if self._last is None or now > self._last:
            self._last = now
        self._sum += sample
        self._weight += 1.0

    @property
    def value(self) -> float | None:
        return self._sum / self._weight if self._weight > 0 else None


def decay(last: float, now: float, tau: float) -> float | None:
    """The factor a sample taken at `last` keeps at `now`; None when `now` is not later."""
    if now > last:
        return math.exp(-(now - last) / tau) if tau > 0 else 0.0
    return None


def peak_ewma(current: float, sample: float, dt: float, tau: float) -> float:
    """Finagle's peak EWMA: up at once on a slower sample, down with time constant tau."""
    if current <= 0 or sample >= current:
        return sample
    keep = math.exp(-max(dt, 0.0) / tau) if tau > 0 else 0.0
    return current * keep + sample * (1.0 - keep)


def exploration_floor(own_weight: float, peer_weight: float, exploration: float) -> float:
    """Smallest score that keeps `exploration` of the traffic shared with peers of total
    configured weight `peer_weight` on a gateway of weight `own_weight`."""
    if exploration <= 0 or peer_weight <= 0 or own_weight <= 0:
        return 0.0
    share = min(exploration, 0.99)
    return min(1.0, share / (1.0 - share) * peer_weight / own_weight)


def score(
    policy: Degradation, short_lat: float, long_lat: float, short_err: float
) -> tuple[float, str]:
    """Score in [min_score, 1] and what pulled it down.

    Latency is judged against the gateway's own baseline (there is no absolute "slow"
    for a payment API); errors are judged absolutely, because a baseline that has slowly
    absorbed 20% errors is not healthy.
    """
    lat_score, err_score, ratio = _scores(policy, short_lat, long_lat, short_err)
    if err_score < lat_score:
        return err_score, f"error rate {short_err:.0%}"
    return lat_score, f"latency {ratio:.2f}x baseline"


def _scores(
    policy: Degradation, short_lat: float, long_lat: float, short_err: float
) -> tuple[float, float, float]:
    """(latency score, error score, latency ratio): `score` without the reason's text,
    which the request path needs only when the DEGRADED flag is set."""
    floor = policy.min_score
    ratio = short_lat / max(long_lat, LATENCY_FLOOR)
    lat_score = 1.0
    if ratio > 1.0:
        span = policy.latency_ratio - 1.0
        drift = 1.0 if span <= 0 else min(1.0, (ratio - 1.0) / span)
        lat_score = 1.0 - (1.0 - floor) * drift
    err_score = 1.0
    if short_err > 0 and policy.error_rate > 0:
        err_score = 1.0 - (1.0 - floor) * min(1.0, short_err / policy.error_rate)
    return lat_score, err_score, ratio


@dataclass(frozen=True, slots=True, kw_only=True)
class DegradationStatus:
    """A snapshot of one gateway's predictive-health state for the admin API."""

    warming_up: bool
    raw_score: float
    latency_short_ms: float | None
    latency_long_ms: float | None
    error_rate_short: float | None
    error_rate_long: float | None


class DegradationTracker:
    """Short/long averages and score of one gateway; policy read from `st.gateway`."""

    __slots__ = (
        "_events",
        "_first",
        "_last_timed",
        "_long_err",
        "_long_lat",
        "_raw",
        "_samples",
        "_short_err",
        "_short_lat",
        "st",
    )

    def __init__(self, st: GatewayState, events: Emitter) -> None:
        self.st = st
        self._events = events
        self._short_lat = DecayingMean()
        self._long_lat = DecayingMean()
        self._short_err = DecayingMean()
        self._long_err = DecayingMean()
        self._samples = 0
        self._first: float | None = None
        self._last_timed: float | None = None
        self._raw = 1.0

    def _warming_up(self, now: float) -> bool:
        if self._first is None or self._samples < WARMUP_SAMPLES:
            return True
        return now - self._first < self.st.gateway.degradation.short_window

    def observe(self, outcome: Outcome, latency: float, now: float, floor: float = 0.0) -> None:
        """Fold one finished attempt in; `floor` is the exploration floor for the score."""
        if outcome is Outcome.CANCELLED or outcome is Outcome.THROTTLED:
            return
        policy = self.st.gateway.degradation
        short_tau, long_tau = policy.short_window, policy.long_window
        # Each pair of means is always sampled together, so shares its last time; and the
        # latency pair's is the error pair's whenever the previous answer was timed too:
        # then the two decays are worked out once for all four.
        last = self._short_err._last
        short_decay = long_decay = None
        if last is not None and now > last:
            # as `decay` works them out, written out: once per answer
            short_decay = math.exp(-(now - last) / short_tau) if short_tau > 0 else 0.0
            long_decay = math.exp(-(now - last) / long_tau) if long_tau > 0 else 0.0
        if outcome is _SUCCESS or outcome is _SERVER_ERROR or outcome is _TIMEOUT:
            dt = 0.0 if self._last_timed is None else now - self._last_timed
            self.st.ewma_latency = peak_ewma(self.st.ewma_latency, latency, dt, short_tau)
            self.st.ewma_at = now
            self._last_timed = now
            lat_last = self._short_lat._last
            if lat_last == last:
                self._short_lat.fold(latency, now, short_decay)
                self._long_lat.fold(latency, now, long_decay)
            else:
                self._short_lat.add(latency, now, short_tau)
                self._long_lat.add(latency, now, long_tau)
        failed = 1.0 if outcome.is_failure else 0.0
        self._short_err.fold(failed, now, short_decay)
        self._long_err.fold(failed, now, long_decay)
        self._samples += 1
        if self._first is None:
            self._first = now
        self.evaluate(now, floor)

    def evaluate(self, now: float, floor: float = 0.0) -> float:
        """Recompute the score and the DEGRADED flag; returns the score now in force."""
        # Once per request: the averages read in place rather than through `value` and
        # `_warming_up`, which cost a call each and say the same.
        st = self.st
        policy = st.gateway.degradation
        raw = 1.0
        m = self._short_lat
        short_lat = m._sum / m._weight if m._weight > 0 else None
        m = self._long_lat
        long_lat = m._sum / m._weight if m._weight > 0 else None
        m = self._short_err
        short_err = m._sum / m._weight if m._weight > 0 else 0.0
        first = self._first
        warming = (
            first is None or self._samples < WARMUP_SAMPLES or now - first < policy.short_window
        )
        if policy.enabled and not warming:
            if short_lat is None or long_lat is None:
                short_lat = long_lat = 0.0
            lat_score, err_score, _ = _scores(policy, short_lat, long_lat, short_err)
            raw = err_score if err_score < lat_score else lat_score
        self._raw = raw
        applied = 1.0 if raw >= 1.0 else max(raw, policy.min_score, min(floor, 1.0))
        st.score = applied
        degraded = bool(st.bits & DEGRADED_BIT)
        if not degraded and raw < DEGRADE_BELOW:
            assert short_lat is not None and long_lat is not None  # raw < 1: both were set
            why = score(policy, short_lat, long_lat, short_err)[1]
            logger.warning("%s degraded to %.2f: %s", self.st.name, raw, why)
            self.st.set_flag(Flag.DEGRADED, why)
            self._events.emit(
                "gateway.degraded",
                Severity.WARNING,
                gateway=self.st.name,
                score=round(raw, 4),
                reason=why,
            )
        elif degraded and raw >= RECOVER_AT:
            logger.info("%s recovered to %.2f", self.st.name, raw)
            self.st.clear_flag(Flag.DEGRADED, f"score {raw:.2f}")
            self._events.emit(
                "gateway.recovered", Severity.INFO, gateway=self.st.name, score=round(raw, 4)
            )
        return applied

    @property
    def usual_latency(self) -> float | None:
        """The long-window latency: how fast the gateway usually answers (None: no
        sample yet, or still warming up)."""
        if self._samples < WARMUP_SAMPLES:
            return None
        return self._long_lat.value

    def reset(self, now: float) -> None:
        """Forget every average: the gateway is back from an outage, and what it did
        before (timeouts, errors) must not hold its score down now. It warms up again."""
        self._short_lat = DecayingMean()
        self._long_lat = DecayingMean()
        self._short_err = DecayingMean()
        self._long_err = DecayingMean()
        self._samples = 0
        self._first = None
        self._last_timed = None
        self.st.ewma_latency = 0.0
        self.evaluate(now)

    def status(self, now: float) -> DegradationStatus:
        short_lat, long_lat = self._short_lat.value, self._long_lat.value
        return DegradationStatus(
            warming_up=self._warming_up(now),
            raw_score=self._raw,
            latency_short_ms=None if short_lat is None else short_lat * 1000,
            latency_long_ms=None if long_lat is None else long_lat * 1000,
            error_rate_short=self._short_err.value,
            error_rate_long=self._long_err.value,
        )
