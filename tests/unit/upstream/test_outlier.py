from __future__ import annotations

import pytest

from proxy.clock import ManualClock
from proxy.config.model import OutlierDetection
from proxy.events import Severity
from proxy.upstream.outlier import (
    PROBE_STALE_AFTER,
    WINDOW_BUCKETS,
    OutlierDetector,
    ejection_time,
    slow_start_factor,
)
from proxy.upstream.state import Flag, GatewayState, Outcome
from tests.unit.upstream.health_support import Recorder, gateway

POLICY = OutlierDetection(
    consecutive_failures=3,
    failure_percentage=50.0,
    window=10.0,
    min_requests=6,
    base_ejection=5.0,
    max_ejection=30.0,
    slow_start=10.0,
)


class Setup:
    def __init__(self, policy: OutlierDetection = POLICY, *, allow: bool = True) -> None:
        self.clock = ManualClock()
        self.st = GatewayState(gateway(outlier=policy))
        self.rec = Recorder()
        self.allow = allow
        self.det = OutlierDetector(
            self.st, self.rec, lambda _st, _since: self.allow, self.clock.now()
        )

    def send(self, outcome: Outcome, latency: float = 0.01) -> str | None:
        """One request through admission, start and finish, as the request path does."""
        now = self.clock.now()
        refused = self.det.admit(now)
        if refused is None:
            self.det.started(now)
            self.clock.advance(latency)
            self.det.finished(outcome, latency, self.clock.now())
        return refused

    def eject(self) -> None:
        for _ in range(POLICY.consecutive_failures):
            self.send(Outcome.SERVER_ERROR)
        assert self.st.flags & Flag.EJECTED

    def ejected(self) -> bool:
        return bool(self.st.flags & Flag.EJECTED)


@pytest.mark.parametrize(
    "outcome",
    [
        Outcome.CONNECT_FAILURE,
        Outcome.TIMEOUT,
        Outcome.RESET,
        Outcome.BAD_RESPONSE,
        Outcome.SERVER_ERROR,
    ],
    ids=lambda o: o.value,
)
def test_consecutive_failures_eject(outcome: Outcome) -> None:
    s = Setup()
    s.send(outcome)
    s.send(outcome)
    assert not s.ejected()
    s.send(outcome)
    assert s.ejected()
    assert s.det.admit(s.clock.now()) == "ejected"


@pytest.mark.parametrize(
    ("between", "ejected"),
    [
        (Outcome.SUCCESS, False),
        (Outcome.THROTTLED, True),
        (Outcome.CANCELLED, True),
    ],
    ids=["success-resets", "429-is-neutral", "cancel-is-neutral"],
)
def test_what_breaks_a_run_of_failures(between: Outcome, ejected: bool) -> None:
    s = Setup(OutlierDetection(consecutive_failures=3, failure_percentage=0))
    s.send(Outcome.TIMEOUT)
    s.send(Outcome.TIMEOUT)
    s.send(between)
    s.send(Outcome.TIMEOUT)
    assert s.ejected() is ejected


def test_429s_alone_never_eject() -> None:
    s = Setup()
    for _ in range(50):
        s.send(Outcome.THROTTLED)
    assert not s.ejected()
    assert s.det.status(s.clock.now()).window_requests == 0


@pytest.mark.parametrize(
    ("pattern", "ejected"),
    [
        ("FSFSFS", True),  # 50% of 6: at the threshold
        ("FSFSF", False),  # 60%, but under min_requests
        ("FSSFSSFSS", False),  # 33%
        ("FFSFFSS", True),  # never three in a row, still 57%
    ],
    ids=["at-threshold", "too-few", "below", "no-run-but-over"],
)
def test_failure_percentage(pattern: str, ejected: bool) -> None:
    s = Setup()
    for c in pattern:
        s.send(Outcome.SERVER_ERROR if c == "F" else Outcome.SUCCESS)
    assert s.ejected() is ejected
    if ejected:
        assert "%" in str(s.rec.of("gateway.ejected")[0]["reason"])


def test_failures_slide_out_of_the_window() -> None:
    s = Setup()
    for c in "FSFSF":
        s.send(Outcome.SERVER_ERROR if c == "F" else Outcome.SUCCESS)
    s.clock.advance(POLICY.window)  # those five are now too old to count
    for c in "SFSFS":
        s.send(Outcome.SERVER_ERROR if c == "F" else Outcome.SUCCESS)
    assert not s.ejected()
    assert s.det.status(s.clock.now()).window_requests == 5


def test_the_window_holds_counts_not_requests_at_any_rate() -> None:
    """A busy gateway's window costs the same as an idle one's: buckets of counts."""
    s = Setup()
    step = POLICY.window / 20_000
    for i in range(40_000):  # two windows' worth, evenly spread, every tenth one failing
        s.send(Outcome.SERVER_ERROR if i % 10 == 0 else Outcome.SUCCESS, latency=step)
    status = s.det.status(s.clock.now())
    assert len(s.det._window) <= WINDOW_BUCKETS + 1
    # The last window's requests, less at most one bucket's width of them.
    assert 20_000 * (1 - 1 / WINDOW_BUCKETS) - 1 <= status.window_requests <= 20_000
    assert status.window_failures == pytest.approx(status.window_requests / 10, abs=2)
    assert not s.ejected()


def test_ejection_event() -> None:
    s = Setup()
    s.eject()
    assert s.rec.events == [
        (
            "gateway.ejected",
            Severity.CRITICAL,
            {
                "gateway": "g1",
                "source": "passive",
                "reason": "3 consecutive failures",
                "duration_s": 5.0,
            },
        )
    ]


@pytest.mark.parametrize(
    ("n", "seconds"),
    [(1, 5.0), (2, 10.0), (3, 20.0), (4, 30.0), (9, 30.0)],
    ids=["first", "second", "third", "capped", "still-capped"],
)
def test_ejection_time(n: int, seconds: float) -> None:
    assert ejection_time(POLICY, n) == seconds


def test_failed_probes_double_the_ejection_up_to_the_cap() -> None:
    s = Setup()
    s.eject()
    for _ in range(4):
        until = s.det.status(s.clock.now()).ejected_for_s
        s.clock.advance(until)
        assert s.send(Outcome.TIMEOUT) is None  # the half-open probe, and it fails
    durations = [e["duration_s"] for e in s.rec.of("gateway.ejected")]
    assert durations == [5.0, 10.0, 20.0, 30.0, 30.0]
    assert s.rec.of("gateway.ejected")[1]["reason"] == "half-open probe failed (timeout)"


def test_half_open_lets_exactly_one_probe_through() -> None:
    s = Setup()
    s.eject()
    s.clock.advance(4.999)
    assert s.det.admit(s.clock.now()) == "ejected"
    s.clock.advance(0.001)
    now = s.clock.now()
    # Looking is free: the balancer may ask many times before choosing.
    assert s.det.admit(now) is None
    assert s.det.admit(now) is None
    s.det.started(now)
    assert s.det.admit(now) == "half-open"
    status = s.det.status(now)
    assert status.half_open and status.probe_in_flight
    s.clock.advance(0.2)
    s.det.finished(Outcome.SUCCESS, 0.2, s.clock.now())
    assert not s.ejected()
    assert s.rec.kinds() == ["gateway.ejected", "gateway.restored"]
    assert s.rec.of("gateway.restored") == [
        {"gateway": "g1", "source": "passive", "reason": "half-open probe succeeded"}
    ]
    assert s.det.admit(s.clock.now()) is None


def test_requests_sent_before_the_ejection_do_not_decide_the_probe() -> None:
    s = Setup()
    now = s.clock.now()
    s.det.started(now)  # an old, slow request
    s.eject()
    s.clock.advance(5.0)
    s.det.started(s.clock.now())  # the probe
    s.clock.advance(0.1)
    # The old one finishes first, successfully: it began long before the ejection.
    s.det.finished(Outcome.SUCCESS, s.clock.now() - now, s.clock.now())
    assert s.ejected()
    assert s.det.admit(s.clock.now()) == "half-open"
    s.det.finished(Outcome.SERVER_ERROR, 0.1, s.clock.now())
    assert s.rec.of("gateway.ejected")[-1]["duration_s"] == 10.0


@pytest.mark.parametrize("outcome", [Outcome.CANCELLED, Outcome.THROTTLED], ids=lambda o: o.value)
def test_probe_without_a_verdict_frees_the_slot(outcome: Outcome) -> None:
    s = Setup()
    s.eject()
    s.clock.advance(5.0)
    s.send(outcome)
    assert s.ejected()
    assert s.det.admit(s.clock.now()) is None


def test_a_lost_probe_frees_the_slot_eventually() -> None:
    s = Setup()
    s.eject()
    s.clock.advance(5.0)
    s.det.started(s.clock.now())
    s.clock.advance(PROBE_STALE_AFTER - 1)
    assert s.det.admit(s.clock.now()) == "half-open"
    s.clock.advance(1)
    assert s.det.admit(s.clock.now()) is None


def test_ejection_count_decays_after_a_calm_period() -> None:
    s = Setup()
    s.eject()
    s.clock.advance(5.0)
    s.send(Outcome.TIMEOUT)  # probe fails: second ejection, 10 s
    s.clock.advance(10.0)
    s.send(Outcome.SUCCESS)  # restored with n=2
    assert s.det.status(s.clock.now()).ejections == 2
    s.clock.advance(10.0)  # one calm step (max(window, 10 s)) forgives one ejection
    assert s.det.status(s.clock.now()).ejections == 1
    s.eject()
    assert s.rec.of("gateway.ejected")[-1]["duration_s"] == 10.0
    s.clock.advance(10.0)
    s.send(Outcome.SUCCESS)
    s.clock.advance(1000.0)
    s.eject()
    assert s.rec.of("gateway.ejected")[-1]["duration_s"] == 5.0


def test_flapping_gateway_keeps_doubling() -> None:
    s = Setup()
    for expected in (5.0, 10.0, 20.0):
        s.eject()
        assert s.rec.of("gateway.ejected")[-1]["duration_s"] == expected
        s.clock.advance(expected)
        s.send(Outcome.SUCCESS)  # probe passes
        s.clock.advance(1.0)  # ...and it fails again right away


def test_cap_holds_the_ejection_back() -> None:
    s = Setup(allow=False)
    for _ in range(10):
        s.send(Outcome.SERVER_ERROR)
    assert not s.ejected()
    assert s.rec.events == []
    s.allow = True
    s.send(Outcome.SERVER_ERROR)
    assert s.ejected()


@pytest.mark.parametrize(
    ("elapsed", "factor"),
    [(0.0, 0.1), (2.5, 0.325), (5.0, 0.55), (10.0, 1.0), (60.0, 1.0)],
    ids=["at-return", "quarter", "half", "done", "long-after"],
)
def test_slow_start_ramp(elapsed: float, factor: float) -> None:
    s = Setup()
    s.eject()
    s.clock.advance(5.0)
    s.send(Outcome.SUCCESS, latency=0.0)
    s.clock.advance(elapsed)
    s.det.admit(s.clock.now())
    assert s.st.weight_factor == pytest.approx(factor)


@pytest.mark.parametrize(
    ("slow_start", "since", "factor"),
    [(0.0, 0.0, 1.0), (10.0, None, 1.0), (10.0, 5.0, 0.1)],
    ids=["disabled", "never-left", "clock-behind"],
)
def test_slow_start_factor_edges(slow_start: float, since: float | None, factor: float) -> None:
    policy = OutlierDetection(slow_start=slow_start)
    assert slow_start_factor(policy, since, 0.0 if since is None else since - 1) == factor


# -- what the cap is told, and recovery ----------------------------------------------------


def test_the_cap_hears_whether_the_failure_is_proven() -> None:
    heard: list[float | None] = []
    clock = ManualClock()
    st = GatewayState(gateway(outlier=POLICY))

    def may_eject(_st: GatewayState, since: float | None) -> bool:
        heard.append(since)
        return False

    det = OutlierDetector(st, Recorder(), may_eject, clock.now())
    det.finished(Outcome.SUCCESS, 0.01, clock.now())
    for _ in range(3):
        clock.advance(1.0)
        det.finished(Outcome.TIMEOUT, 0.3, clock.now())
    # The run began when the first of the three failed requests was sent.
    assert heard == [pytest.approx(1000.7)]
    for outcome in "FSFSFSF":
        clock.advance(0.1)
        det.finished(Outcome.RESET if outcome == "F" else Outcome.SUCCESS, 0.01, clock.now())
    assert heard[-1] is None  # a failure percentage is never proven


def test_active_checks_cut_the_ejection_short() -> None:
    s = Setup()
    s.eject()
    s.clock.advance(1.0)
    assert s.det.end_ejection(s.clock.now(), "checks pass")
    assert s.det.admit(s.clock.now()) is None and s.st.probe_due
    assert not s.det.end_ejection(s.clock.now(), "again")  # already half-open
    s.send(Outcome.SUCCESS)
    assert not s.ejected()
    assert not s.det.end_ejection(s.clock.now(), "not ejected")
    s.clock.advance(1.0)
    s.eject()  # back soon after returning: a second ejection in a row, 10 s
    assert not s.det.end_ejection(s.clock.now(), "checks pass")
    assert s.det.admit(s.clock.now()) == "ejected"


def test_probe_due_until_the_probe_starts() -> None:
    s = Setup()
    s.eject()
    due = []
    due.append(s.st.probe_due)
    s.clock.advance(5.0)
    assert s.det.admit(s.clock.now()) is None
    due.append(s.st.probe_due)
    s.det.started(s.clock.now())
    due.append(s.st.probe_due)
    assert due == [False, True, False]


@pytest.mark.parametrize(
    "straggler",
    [Outcome.TIMEOUT, Outcome.SUCCESS],
    ids=lambda o: o.value,
)
def test_only_a_request_started_after_the_return_decides_the_probe(straggler: Outcome) -> None:
    s = Setup()
    t0 = s.clock.now()
    s.det.started(t0)  # in flight from before the outage
    s.eject()
    s.clock.advance(5.0)
    s.det.started(s.clock.now())  # the probe
    s.clock.advance(0.1)
    s.det.finished(straggler, s.clock.now() - t0, s.clock.now())
    assert s.ejected()
    assert s.det.admit(s.clock.now()) == "half-open"  # neither restored nor ejected again
    s.det.finished(Outcome.SUCCESS, 0.1, s.clock.now())
    assert not s.ejected()
    assert [f["duration_s"] for f in s.rec.of("gateway.ejected")] == [5.0]


def test_stragglers_finishing_after_the_return_do_not_count() -> None:
    s = Setup()
    t0 = s.clock.now()
    for _ in range(3):
        s.det.started(t0)
    s.eject()
    s.clock.advance(5.0)
    s.send(Outcome.SUCCESS)
    for _ in range(3):
        s.det.finished(Outcome.TIMEOUT, s.clock.now() - t0, s.clock.now())
    assert not s.ejected()
    assert s.det.status(s.clock.now()).consecutive_failures == 0


def test_time_to_full_share_is_reported() -> None:
    s = Setup()
    s.eject()
    s.clock.advance(5.0)
    s.send(Outcome.SUCCESS, latency=0.0)
    assert s.det.status(s.clock.now()).full_share_in_s == pytest.approx(10.0)
    s.clock.advance(4.0)
    assert s.det.status(s.clock.now()).full_share_in_s == pytest.approx(6.0)
    s.clock.advance(6.0)
    s.det.refresh_weight(s.clock.now())
    assert s.det.status(s.clock.now()).full_share_in_s == 0.0


@pytest.mark.parametrize(
    ("in_flight", "answered_since", "ejected"),
    [
        (2, False, True),  # 1 timed out + 2 waiting on a silent gateway = 3
        (1, False, False),  # 1 + 1 is not yet a run of 3
        (5, True, False),  # it answered something after the request was sent: just slow
    ],
    ids=["silent", "too-few-waiting", "answering"],
)
def test_a_timeout_on_a_silent_gateway_counts_the_requests_waiting_on_it(
    in_flight: int, answered_since: bool, ejected: bool
) -> None:
    s = Setup()
    s.send(Outcome.SUCCESS)
    s.clock.advance(0.01)
    sent = s.clock.now()
    s.clock.advance(0.1)
    if answered_since:
        s.det.finished(Outcome.SUCCESS, 0.05, s.clock.now())
    s.clock.advance(0.2)
    s.st.in_flight = in_flight
    s.det.finished(Outcome.TIMEOUT, s.clock.now() - sent, s.clock.now())
    assert s.ejected() is ejected
    if ejected:
        assert "nothing answered" in str(s.rec.of("gateway.ejected")[0]["reason"])


@pytest.mark.parametrize(
    ("checks", "after_ejection"),
    [
        ("", None),
        ("F", "ejected"),
        ("FS", None),
        ("SF", "ejected"),
    ],
    ids=["no-checks", "failing", "passing-again", "failing-again"],
)
def test_a_failing_active_check_holds_the_half_open_probe_back(
    checks: str, after_ejection: str | None
) -> None:
    s = Setup()
    s.det.active_result(False)  # before the ejection: says nothing about its end
    s.eject()
    for c in checks:
        s.det.active_result(c == "S")
    s.clock.advance(5.0)
    assert s.det.admit(s.clock.now()) == after_ejection
    assert s.st.probe_due is (after_ejection is None)
    assert s.det.status(s.clock.now()).half_open is (after_ejection is None)
