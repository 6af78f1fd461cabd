"""Passive outlier detection of one gateway from the outcomes of real requests.

Owns: `OutlierDetector`, which owns the EJECTED flag and the slow-start ramp
(`GatewayState.weight_factor`). A gateway is ejected after `consecutive_failures` failures
in a row — counting, when a request times out and the gateway has answered nothing since
it was sent, the requests still waiting on it (a gateway gone silent) — or when failures
reach `failure_percentage` of at least `min_requests` requests in the sliding `window` — a
per-gateway rule, so it works with the 2-4 gateways a payment route has (Envoy's
success-rate outlier needs five hosts to compare). Ejection lasts
`base_ejection * 2^(n-1)` capped at `max_ejection`, n counting ejections without a calm
period in between, unless active checks see the gateway come back from a first ejection
(`end_ejection`),
and longer while its latest active check since the ejection failed (the half-open probe
is a real payment: it is not sent to a gateway the checks still see down); then it is
half-open and exactly one request decides: the first one *started*
after it came back. Requests started before that (stragglers from before the ejection)
neither decide the probe nor count against the gateway once it is back.
Must not: read the clock (every method takes `now`), decide the share of gateways that may
be out at once (the caller's `may_eject` does, it sees every gateway) or count 429s and
cancelled attempts as failures.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config.model import OutlierDetection
from proxy.events import Emitter, Severity
from proxy.upstream.state import Flag, GatewayState, Outcome

logger = logging.getLogger(__name__)

#: Weight share a gateway restarts with after coming back; it ramps linearly to 1.
SLOW_START_FLOOR = 0.1
#: A half-open probe that never reports back (a caller lost it) frees the slot after this,
#: so one lost request cannot keep a gateway out for good.
PROBE_STALE_AFTER = 60.0
#: Slack when telling a request started after the gateway came back from one started
#: before: callers measure latency from the `started()` call, so only float noise remains.
START_TOLERANCE = 0.005

#: `may_eject(st, since)`: whether `st` may be ejected now. `since` is when the first
#: request of its run of consecutive failures was sent (a proven failure), None for a
#: failure-percentage verdict.
MayEject = Callable[[GatewayState, float | None], bool]


def ejection_time(policy: OutlierDetection, n: int) -> float:
    """How long the n-th ejection in a row lasts (n >= 1)."""
    return float(min(policy.base_ejection * 2 ** max(n - 1, 0), policy.max_ejection))


def slow_start_factor(policy: OutlierDetection, since: float | None, now: float) -> float:
    """Weight factor `now` for a gateway that came back at `since` (None: never left)."""
    if since is None or policy.slow_start <= 0:
        return 1.0
    ramp = (now - since) / policy.slow_start
    return min(1.0, SLOW_START_FLOOR + (1.0 - SLOW_START_FLOOR) * max(ramp, 0.0))


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierStatus:
    """A snapshot of one gateway's passive-health state for the admin API."""

    ejected: bool
    ejected_for_s: float
    half_open: bool
    probe_in_flight: bool
    ejections: int
    consecutive_failures: int
    window_requests: int
    window_failures: int
    slow_start_factor: float
    full_share_in_s: float  # until the slow-start ramp reaches the full weight


#: The sliding window is kept as this many buckets of counts, not one entry per request:
#: memory stays the same at any rate (one entry per request held ~10 MiB at 12k requests/s
#: over the default 10 s). A bucket leaves as its first request ages out, so a request
#: counts for the window less at most one bucket's width (5% of it).
WINDOW_BUCKETS = 20


class _Bucket:
    """Requests and failures of the window that finished from `start` on, for one
    bucket's width."""

    __slots__ = ("failures", "requests", "start")

    def __init__(self, start: float) -> None:
        self.start = start
        self.requests = 0
        self.failures = 0


class OutlierDetector:
    """Ejection state of one gateway; `policy` is read from `st.gateway` on every call."""

    __slots__ = (
        "_back_at",
        "_calm_since",
        "_check_failing",
        "_consecutive",
        "_ejected",
        "_ejected_at",
        "_ejected_until",
        "_ejections",
        "_events",
        "_held",
        "_last_answer",
        "_may_eject",
        "_on_return",
        "_probe_started",
        "_ramp_since",
        "_run_since",
        "_window",
        "_window_failures",
        "_window_requests",
        "last_success",
        "st",
    )

    def __init__(
        self,
        st: GatewayState,
        events: Emitter,
        may_eject: MayEject,
        now: float,
        *,
        on_return: Callable[[float], None] | None = None,
    ) -> None:
        self.st = st
        self._events = events
        self._may_eject = may_eject
        self._on_return = on_return
        self._consecutive = 0
        self._run_since = 0.0  # when the first failed request of the current run was sent
        #: When a request to it last succeeded (None: never); peers read it to tell a
        #: gateway's own fault from one every gateway shares.
        self.last_success: float | None = None
        self._back_at: float | None = None  # when it last came back (half-open or restored)
        self._last_answer = now  # when it last answered anything (a timeout is no answer)
        self._check_failing = False  # the latest active check since the ejection failed
        self._window: deque[_Bucket] = deque()
        self._window_requests = 0
        self._window_failures = 0
        self._ejected = False
        self._ejections = 0
        self._ejected_at = 0.0
        self._ejected_until = 0.0
        self._calm_since = now
        self._probe_started: float | None = None
        self._ramp_since: float | None = None
        self._held = False  # an ejection is being held back by the cap (logged once)

    @property
    def policy(self) -> OutlierDetection:
        return self.st.gateway.outlier

    # -- admission -------------------------------------------------------------------

    def admit(self, now: float) -> str | None:
        """None when passive health lets a request through now, else why not."""
        self.refresh_weight(now)
        if not self._ejected:
            return None
        if now < self._ejected_until or self._check_failing:
            return "ejected"
        if self._probe_started is not None and now - self._probe_started < PROBE_STALE_AFTER:
            return "half-open"
        # Half-open with a free slot: the balancer sends the next request here at once
        # rather than when round robin comes around to it.
        self.st.probe_due = True
        return None

    def started(self, now: float) -> None:
        """A request was sent; when half-open with a free slot, it becomes the probe."""
        if not self._ejected or now < self._ejected_until or self._check_failing:
            return
        if self._probe_started is None or now - self._probe_started >= PROBE_STALE_AFTER:
            self._probe_started = now
            self.st.probe_due = False

    # -- outcomes --------------------------------------------------------------------

    @property
    def last_answer(self) -> float:
        """When the gateway last answered anything (a timeout is no answer)."""
        return self._last_answer

    def predates_return(self, latency: float, now: float) -> bool:
        """Whether a request that took `latency` until `now` was started before the
        gateway last came back: what it says is about the gateway before its outage."""
        back = self._back_at
        return back is not None and now - max(latency, 0.0) < back - START_TOLERANCE

    def finished(self, outcome: Outcome, latency: float, now: float) -> None:
        """Count one finished request; `latency` runs from its `started()` call."""
        if self._ejected:
            self._finished_while_ejected(outcome, latency, now)
            return
        if outcome is Outcome.THROTTLED:
            self._last_answer = now  # a 429 is an answer
            return
        if outcome is Outcome.CANCELLED:
            return
        back = self._back_at  # `predates_return`, written out: once per request
        if back is not None and now - max(latency, 0.0) < back - START_TOLERANCE:
            return
        failed = outcome.is_failure
        silent = 0
        if outcome is Outcome.TIMEOUT:
            if self._last_answer < now - latency:
                silent = self.st.in_flight  # waiting on a gateway that answers nothing
        else:
            self._last_answer = now
        if not failed:
            self.last_success = now
            self._consecutive = 0
        else:
            if self._consecutive == 0:
                self._run_since = now - max(latency, 0.0)
            self._consecutive += 1
        window = self._window
        span = self.st.gateway.outlier.window
        last = window[-1] if window else None
        if last is None or now >= last.start + span / WINDOW_BUCKETS:
            last = _Bucket(now)
            window.append(last)
        last.requests += 1
        self._window_requests += 1
        if failed:
            last.failures += 1
            self._window_failures += 1
        if window[0].start <= now - span:
            self._prune(now)
        if not failed and not self._window_failures:
            # What `_verdict` finds then: no run (a success ended it), no failed share.
            self._held = False
            return
        verdict = self._verdict(silent)
        if verdict is None:
            self._held = False
            return
        reason, proven = verdict
        if not self._may_eject(self.st, self._run_since if proven else None):
            if not self._held:
                logger.warning(
                    "%s: %s, but ejecting it would exceed the ejection cap", self.st.name, reason
                )
            self._held = True
            return
        self._held = False
        self._eject(now, reason, self._decayed_ejections(now) + 1)

    def _finished_while_ejected(self, outcome: Outcome, latency: float, now: float) -> None:
        if self._probe_started is None or self.predates_return(latency, now):
            return  # started before it came back: it says nothing new
        self._probe_started = None
        if outcome is Outcome.CANCELLED or outcome is Outcome.THROTTLED:
            return  # no verdict; the next request after this one probes again
        if outcome.is_failure:
            self._eject(now, f"half-open probe failed ({outcome.value})", self._ejections + 1)
        else:
            self._restore(now)

    def _prune(self, now: float) -> None:
        """Drop the buckets whose first request is older than the window."""
        horizon = now - self.policy.window
        window = self._window
        while window and window[0].start <= horizon:
            gone = window.popleft()
            self._window_requests -= gone.requests
            self._window_failures -= gone.failures

    def _verdict(self, silent: int = 0) -> tuple[str, bool] | None:
        """(why, whether the failure is proven by a run of consecutive failures).

        `silent`: requests still waiting on a gateway that has answered nothing since the
        request that just timed out was sent; they join the run, since a gateway that
        answers in milliseconds does not leave them all unanswered for a per-try timeout.
        """
        policy = self.policy
        if 0 < policy.consecutive_failures <= self._consecutive:
            return f"{self._consecutive} consecutive failures", True
        if silent and 0 < policy.consecutive_failures <= self._consecutive + silent:
            return (
                f"{self._consecutive} timed out and {silent} waiting, nothing answered",
                True,
            )
        seen = self._window_requests
        if 0 < policy.failure_percentage <= 100 and seen and seen >= policy.min_requests:
            pct = 100.0 * self._window_failures / seen
            if pct >= policy.failure_percentage:
                return f"{pct:.0f}% of {seen} requests failed", False
        return None

    # -- transitions -----------------------------------------------------------------

    def _decayed_ejections(self, now: float) -> int:
        """Ejections in a row, less one for each calm period served since the last return.

        A calm period is as long as the ejection it would otherwise earn (at least one
        window), so a gateway that flaps keeps doubling and one that settled starts over.
        """
        n = self._ejections
        calm = now - self._calm_since
        while n > 0:
            step = max(self.policy.window, ejection_time(self.policy, n))
            if calm < step:
                break
            calm -= step
            n -= 1
        return n

    def _eject(self, now: float, reason: str, n: int) -> None:
        duration = ejection_time(self.policy, n)
        self._ejected = True
        self._ejections = n
        self._ejected_at = now
        self._ejected_until = now + duration
        self._probe_started = None
        self._back_at = self._ejected_until  # moved sooner if active checks see it back
        self._check_failing = False
        self.st.probe_due = False
        self._consecutive = 0
        self._window.clear()
        self._window_requests = 0
        self._window_failures = 0
        logger.warning("%s ejected for %.1fs: %s", self.st.name, duration, reason)
        self.st.set_flag(Flag.EJECTED, reason)
        self._events.emit(
            "gateway.ejected",
            Severity.CRITICAL,
            gateway=self.st.name,
            source="passive",
            reason=reason,
            duration_s=duration,
        )

    def active_result(self, ok: bool) -> None:
        """An active check's verdict. While ejected, a failed one holds the half-open
        probe back until a check passes."""
        if self._ejected:
            self._check_failing = not ok

    def end_ejection(self, now: float, reason: str) -> bool:
        """Cut a first passive ejection short: the gateway is half-open from `now`, so the
        next request probes it. False when it was not ejected, already half-open, or ejected
        again soon after a return: a flapping gateway serves its doubled ejection in full,
        since passing checks are what it showed before failing again."""
        if not self._ejected or now >= self._ejected_until or self._ejections > 1:
            return False
        logger.info(
            "%s: ejection cut short by %.1fs: %s", self.st.name, self._ejected_until - now, reason
        )
        self._ejected_until = now
        self._back_at = now
        return True

    def _restore(self, now: float) -> None:
        reason = "half-open probe succeeded"
        self._ejected = False
        self._calm_since = now
        self._back_at = now
        self.st.probe_due = False
        self.last_success = now
        self.start_slow_start(now)
        if self._on_return is not None:
            self._on_return(now)
        logger.info("%s restored: %s", self.st.name, reason)
        self.st.clear_flag(Flag.EJECTED, reason)
        self._events.emit(
            "gateway.restored", Severity.INFO, gateway=self.st.name, source="passive", reason=reason
        )

    # -- slow start ------------------------------------------------------------------

    def start_slow_start(self, now: float) -> None:
        """Ramp the gateway's weight up from `SLOW_START_FLOOR` after it came back."""
        self._ramp_since = now
        self.refresh_weight(now)

    def refresh_weight(self, now: float) -> float:
        """Bring `weight_factor` up to date with the clock; the ramp has no timer."""
        factor = slow_start_factor(self.policy, self._ramp_since, now)
        if factor >= 1.0:
            self._ramp_since = None
        self.st.weight_factor = factor
        return factor

    def status(self, now: float) -> OutlierStatus:
        self._prune(now)
        return OutlierStatus(
            ejected=self._ejected,
            ejected_for_s=max(0.0, self._ejected_until - now) if self._ejected else 0.0,
            half_open=self._ejected and now >= self._ejected_until and not self._check_failing,
            probe_in_flight=self._ejected and self._probe_started is not None,
            ejections=self._decayed_ejections(now) if not self._ejected else self._ejections,
            consecutive_failures=self._consecutive,
            window_requests=self._window_requests,
            window_failures=self._window_failures,
            slow_start_factor=slow_start_factor(self.policy, self._ramp_since, now),
            full_share_in_s=0.0
            if self._ramp_since is None
            else max(0.0, self._ramp_since + self.policy.slow_start - now),
        )
