from __future__ import annotations

import itertools
import math

import pytest

from proxy.clock import ManualClock
from proxy.config.model import Degradation
from proxy.events import Severity
from proxy.upstream.degradation import (
    WARMUP_SAMPLES,
    DecayingMean,
    DegradationTracker,
    exploration_floor,
    peak_ewma,
    score,
)
from proxy.upstream.state import Flag, GatewayState, Outcome
from tests.unit.upstream.health_support import Recorder, gateway

POLICY = Degradation(
    short_window=5.0,
    long_window=120.0,
    latency_ratio=2.0,
    error_rate=0.25,
    min_score=0.05,
    exploration=0.02,
)


def test_decaying_mean_weighs_simultaneous_samples_equally() -> None:
    m = DecayingMean()
    for x in (1.0, 2.0, 3.0):
        m.add(x, 100.0, tau=5.0)
    assert m.value == pytest.approx(2.0)


def test_decaying_mean_forgets_with_its_time_constant() -> None:
    m = DecayingMean()
    m.add(1.0, 0.0, tau=5.0)
    m.add(3.0, 5.0, tau=5.0)
    w = math.exp(-1.0)  # the first sample is one time constant old
    assert m.value == pytest.approx((1.0 * w + 3.0) / (w + 1.0))
    assert DecayingMean().value is None


@pytest.mark.parametrize(
    ("current", "sample", "dt", "expected"),
    [
        (0.0, 0.2, 0.0, 0.2),  # first sample
        (0.1, 0.5, 0.0, 0.5),  # slower: jumps up at once
        (0.5, 0.1, 0.0, 0.5),  # faster at the same instant: no weight yet
        (0.5, 0.1, 5.0, 0.5 * math.exp(-1) + 0.1 * (1 - math.exp(-1))),  # decays with tau
    ],
    ids=["first", "peak", "same-instant", "decay"],
)
def test_peak_ewma(current: float, sample: float, dt: float, expected: float) -> None:
    assert peak_ewma(current, sample, dt, tau=5.0) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("short", "long", "err", "expected", "why"),
    [
        (0.1, 0.1, 0.0, 1.0, "latency"),
        (0.05, 0.1, 0.0, 1.0, "latency"),  # faster than baseline
        (0.15, 0.1, 0.0, 1 - 0.95 * 0.5, "latency"),  # half way to the 2x ratio
        (0.2, 0.1, 0.0, 0.05, "latency"),  # at the ratio: floor
        (1.0, 0.1, 0.0, 0.05, "latency"),  # beyond: still the floor
        (0.1, 0.1, 0.125, 1 - 0.95 * 0.5, "error rate"),
        (0.1, 0.1, 0.5, 0.05, "error rate"),
        (0.15, 0.1, 0.2, 1 - 0.95 * 0.8, "error rate"),  # the worse of the two
        (0.004, 0.001, 0.0, 1.0, "latency"),  # jitter on a very fast gateway
    ],
    ids=[
        "steady",
        "faster",
        "slower",
        "at-ratio",
        "far-beyond",
        "some-errors",
        "many-errors",
        "both-worse-errors",
        "fast-jitter",
    ],
)
def test_score(short: float, long: float, err: float, expected: float, why: str) -> None:
    value, reason = score(POLICY, short, long, err)
    assert value == pytest.approx(expected)
    assert reason.startswith(why)


@pytest.mark.parametrize(
    ("own", "peers", "exploration", "floor"),
    [
        (1, 1, 0.02, 0.02 / 0.98),
        (1, 3, 0.02, 3 * 0.02 / 0.98),
        (3, 1, 0.02, 0.02 / 0.98 / 3),
        (1, 0, 0.02, 0.0),  # alone: nothing to share with
        (1, 1, 0.0, 0.0),
        (1, 100, 0.5, 1.0),  # capped
    ],
    ids=["equal", "heavy-peers", "heavy-self", "alone", "off", "capped"],
)
def test_exploration_floor(own: int, peers: int, exploration: float, floor: float) -> None:
    value = exploration_floor(own, peers, exploration)
    assert value == pytest.approx(floor)
    if 0 < value < 1:
        assert value / (value + peers / own) == pytest.approx(exploration)  # the share kept


class Setup:
    def __init__(self, policy: Degradation = POLICY) -> None:
        self.clock = ManualClock()
        self.st = GatewayState(gateway(degradation=policy))
        self.rec = Recorder()
        self.tr = DegradationTracker(self.st, self.rec)

    def feed(
        self,
        latency: float,
        n: int = 1,
        *,
        every: float = 0.1,
        outcome: Outcome = Outcome.SUCCESS,
        floor: float = 0.0,
    ) -> None:
        for _ in range(n):
            self.clock.advance(every)
            self.tr.observe(outcome, latency, self.clock.now(), floor)

    def warm(self) -> None:
        self.feed(0.1, 600, every=0.1)  # a minute at 10 req/s, steady 100 ms


def test_warm_up_ignores_a_noisy_start() -> None:
    s = Setup()
    s.feed(0.01, 5)
    s.feed(0.5, WARMUP_SAMPLES - 6)  # looks like drift, but is just the start
    assert s.tr.status(s.clock.now()).warming_up
    assert s.st.score == 1.0
    assert s.rec.events == []


def test_latency_climb_lowers_the_score_then_recovers() -> None:
    s = Setup()
    s.warm()
    assert s.st.score == 1.0
    scores = []
    for step in range(1, 11):  # 100 ms climbing to 300 ms over 10 s
        s.feed(0.1 + 0.02 * step, 10)
        scores.append(s.st.score)
    assert scores == sorted(scores, reverse=True)
    assert scores[-1] < 0.5
    assert s.st.flags & Flag.DEGRADED
    assert s.st.flags & Flag.EJECTED == Flag.NONE  # shed load, not ejected
    (kind, sev, fields) = s.rec.events[0]
    assert (kind, sev, fields["gateway"]) == ("gateway.degraded", Severity.WARNING, "g1")
    assert str(fields["reason"]).startswith("latency")
    s.feed(0.1, 200)
    assert s.st.score == 1.0
    assert not s.st.flags & Flag.DEGRADED
    assert s.rec.kinds() == ["gateway.degraded", "gateway.recovered"]
    assert float(str(s.rec.of("gateway.recovered")[0]["score"])) >= 0.95


def test_creeping_errors_lower_the_score() -> None:
    s = Setup()
    s.warm()
    for _ in range(20):
        s.feed(0.1, 3)
        s.feed(0.1, 1, outcome=Outcome.SERVER_ERROR)
    assert s.st.score < 0.8
    assert str(s.rec.of("gateway.degraded")[0]["reason"]).startswith("error rate")


@pytest.mark.parametrize("outcome", [Outcome.THROTTLED, Outcome.CANCELLED], ids=lambda o: o.value)
def test_429_and_cancel_are_not_samples(outcome: Outcome) -> None:
    s = Setup()
    s.warm()
    s.feed(5.0, 100, outcome=outcome)
    assert s.st.score == 1.0
    assert s.st.ewma_latency == pytest.approx(0.1)


def test_hysteresis_keeps_the_flag_between_thresholds() -> None:
    s = Setup()
    s.warm()
    trace: list[tuple[float, bool]] = []
    ramp = [0.1 + 0.01 * i for i in range(20)]
    for latency in ramp + ramp[::-1] + [0.1] * 30:  # slowly up, slowly down, settle
        s.feed(latency, 5)
        trace.append((s.tr.status(s.clock.now()).raw_score, bool(s.st.flags & Flag.DEGRADED)))
    for (_, before), (raw, after) in itertools.pairwise(trace):
        if after and not before:
            assert raw < 0.8
        if before and not after:
            assert raw >= 0.95
        if 0.8 <= raw < 0.95:
            assert after == before  # inside the band nothing moves
    in_band = {flag for raw, flag in trace if 0.8 <= raw < 0.95}
    assert in_band == {True, False}  # the band was crossed both ways
    assert s.rec.kinds() == ["gateway.degraded", "gateway.recovered"]


def test_exploration_floor_keeps_some_weight() -> None:
    s = Setup()
    s.warm()
    s.feed(1.0, 50, floor=0.3)
    assert s.tr.status(s.clock.now()).raw_score == pytest.approx(0.05)
    assert s.st.score == pytest.approx(0.3)
    s.feed(1.0, 1, floor=0.0)
    assert s.st.score == pytest.approx(POLICY.min_score)


def test_disabled_keeps_full_score_but_tracks_latency() -> None:
    s = Setup(Degradation(enabled=False))
    s.warm()
    s.feed(1.0, 50)
    assert s.st.score == 1.0
    assert s.rec.events == []
    assert s.st.ewma_latency == pytest.approx(1.0)


def test_peak_latency_follows_slow_samples_at_once_and_fast_ones_slowly() -> None:
    s = Setup()
    s.feed(0.1, 10)
    s.feed(0.9, 1)
    assert s.st.ewma_latency == pytest.approx(0.9)
    s.feed(0.1, 1, every=POLICY.short_window)
    assert s.st.ewma_latency == pytest.approx(0.9 * math.exp(-1) + 0.1 * (1 - math.exp(-1)))
    timed_at = s.clock.now()
    assert s.st.ewma_at == timed_at  # the balancer fades the latency from there on
    s.feed(0.1, 1, outcome=Outcome.CONNECT_FAILURE)  # a refused connect says nothing of speed
    s.feed(0.0, 1, outcome=Outcome.RESET)
    assert s.st.ewma_latency > 0.3
    assert s.st.ewma_at == timed_at


def test_reset_forgets_the_averages_of_before_an_outage() -> None:
    clock = ManualClock()
    st = GatewayState(gateway(degradation=POLICY))
    rec = Recorder()
    tracker = DegradationTracker(st, rec)
    for _ in range(WARMUP_SAMPLES * 2):
        clock.advance(0.5)
        tracker.observe(Outcome.SUCCESS, 0.02, clock.now())
    for _ in range(10):
        clock.advance(0.1)
        tracker.observe(Outcome.TIMEOUT, 0.3, clock.now())
    assert st.flags & Flag.DEGRADED and st.score < 0.5 and st.ewma_latency > 0.2
    tracker.reset(clock.now())
    assert st.score == 1.0 and not st.flags & Flag.DEGRADED and st.ewma_latency == 0.0
    assert rec.kinds()[-1] == "gateway.recovered"
    status = tracker.status(clock.now())
    assert status.warming_up and status.error_rate_short is None


@pytest.mark.parametrize(
    "pattern",
    [
        (Outcome.SUCCESS,),
        (Outcome.SUCCESS, Outcome.CONNECT_FAILURE),
        (Outcome.RESET, Outcome.RESET, Outcome.TIMEOUT, Outcome.SERVER_ERROR),
        (Outcome.BAD_RESPONSE, Outcome.SUCCESS, Outcome.THROTTLED, Outcome.CANCELLED),
    ],
    ids=["all-timed", "timed-and-untimed", "runs-of-each", "with-non-samples"],
)
def test_shared_decays_give_the_averages_one_add_per_mean_would(
    pattern: tuple[Outcome, ...],
) -> None:
    s = Setup()
    short_lat, long_lat, short_err, long_err = (DecayingMean() for _ in range(4))
    steps = (0.1, 0.0, 0.37, 0.0, 1.5)  # some answers share an instant
    for i in range(200):
        outcome = pattern[i % len(pattern)]
        latency = 0.05 + (i % 7) * 0.01
        s.clock.advance(steps[i % len(steps)])
        now = s.clock.now()
        s.tr.observe(outcome, latency, now)
        if outcome in (Outcome.THROTTLED, Outcome.CANCELLED):
            continue
        if outcome in (Outcome.SUCCESS, Outcome.SERVER_ERROR, Outcome.TIMEOUT):
            short_lat.add(latency, now, POLICY.short_window)
            long_lat.add(latency, now, POLICY.long_window)
        failed = 1.0 if outcome.is_failure else 0.0
        short_err.add(failed, now, POLICY.short_window)
        long_err.add(failed, now, POLICY.long_window)
    status = s.tr.status(s.clock.now())
    expected = (short_lat.value, long_lat.value, short_err.value, long_err.value)
    got = (
        None if status.latency_short_ms is None else status.latency_short_ms / 1000,
        None if status.latency_long_ms is None else status.latency_long_ms / 1000,
        status.error_rate_short,
        status.error_rate_long,
    )
    # Exactly equal: the same floating-point operations in the same order.
    assert got == tuple(None if v is None else v * 1000 / 1000 for v in expected)
