from __future__ import annotations

import dataclasses

import pytest

from proxy.config.model import Limits
from proxy.events import Severity
from proxy.upstream.limits import MAX_RETRY_AFTER, GatewayLimiter, TokenBucket
from proxy.upstream.state import Flag, GatewayState
from tests.unit.upstream.health_support import Recorder, gateway

T0 = 1000.0


@pytest.mark.parametrize(
    ("rate", "burst", "steps"),
    [
        # steps: (seconds to advance, whether a take succeeds)
        (1.0, 3, [(0, True), (0, True), (0, True), (0, False)]),
        (1.0, 3, [(0, True), (0, True), (0, True), (0.5, False), (0.5, True), (0, False)]),
        (10.0, 1, [(0, True), (0.05, False), (0.05, True)]),
        (2.0, 2, [(0, True), (0, True), (100, True), (0, True), (0, False)]),
    ],
    ids=["burst-then-empty", "refills-at-rate", "fast-rate-small-burst", "idle-caps-at-burst"],
)
def test_token_bucket(rate: float, burst: int, steps: list[tuple[float, bool]]) -> None:
    now = T0
    bucket = TokenBucket(rate, burst, now)
    for advance, expected in steps:
        now += advance
        assert bucket.take(now) is expected


def test_bucket_ignores_a_clock_reading_from_the_past() -> None:
    bucket = TokenBucket(1.0, 2, T0)
    assert bucket.take(T0 + 1)
    assert bucket.available(T0) == pytest.approx(1.0)


def test_resized_bucket_keeps_what_is_left_within_the_new_burst() -> None:
    bucket = TokenBucket(1.0, 10, T0)
    for _ in range(4):
        bucket.take(T0)
    assert bucket.resized(1.0, 20, T0).available(T0) == pytest.approx(6)
    assert bucket.resized(1.0, 3, T0).available(T0) == pytest.approx(3)


def _limiter(limits: Limits) -> tuple[GatewayLimiter, GatewayState, Recorder]:
    st = GatewayState(gateway(limits=limits))
    rec = Recorder()
    return GatewayLimiter(st, rec, T0), st, rec


@pytest.mark.parametrize(
    ("limits", "in_flight", "expected"),
    [
        (Limits(), 1000, None),
        (Limits(max_in_flight=2), 1, None),
        (Limits(max_in_flight=2), 2, "in-flight-cap"),
        (Limits(max_in_flight=2, rate=1.0, burst=1), 5, "in-flight-cap"),
        (Limits(rate=1.0, burst=1), 0, None),
    ],
    ids=["no-limits", "under-cap", "at-cap", "cap-before-rate", "token-left"],
)
def test_capacity(limits: Limits, in_flight: int, expected: str | None) -> None:
    lim, st, _ = _limiter(limits)
    st.in_flight = in_flight
    assert lim.check_capacity(T0) == expected


def test_checking_capacity_spends_no_token_and_take_does() -> None:
    lim, _, _ = _limiter(Limits(rate=1.0, burst=2))
    for _ in range(10):
        assert lim.check_capacity(T0) is None
    lim.take(T0)
    assert lim.check_capacity(T0) is None
    lim.take(T0)
    assert lim.check_capacity(T0) == "rate-limited"
    assert lim.check_capacity(T0 + 1.0) is None


def test_changed_limits_apply_without_refilling_the_bucket() -> None:
    lim, st, _ = _limiter(Limits(rate=1.0, burst=2))
    lim.take(T0)
    lim.take(T0)
    st.gateway = dataclasses.replace(st.gateway, limits=Limits(rate=100.0, burst=50))
    assert lim.check_capacity(T0) == "rate-limited"
    assert lim.check_capacity(T0 + 0.01) is None
    st.gateway = dataclasses.replace(st.gateway, limits=Limits())
    assert lim.status(T0).tokens is None


@pytest.mark.parametrize(
    ("retry_after", "pause"),
    [(None, 1.0), (5.0, 5.0), (3600.0, MAX_RETRY_AFTER), (0.25, 0.25)],
    ids=["default", "honoured", "capped", "sub-second"],
)
def test_429_backs_off_for_retry_after(retry_after: float | None, pause: float) -> None:
    lim, st, rec = _limiter(Limits())
    assert lim.throttle(retry_after, T0) == pytest.approx(pause)
    assert st.flags & Flag.THROTTLED
    assert lim.check_throttle(T0 + pause - 0.001) == "throttled"
    assert lim.check_throttle(T0 + pause) is None
    assert not st.flags & Flag.THROTTLED
    assert rec.events == [
        ("gateway.throttled", Severity.WARNING, {"gateway": "g1", "retry_after_s": pause})
    ]


def test_zero_retry_after_sets_no_back_off() -> None:
    lim, st, rec = _limiter(Limits())
    assert lim.throttle(0.0, T0) == 0.0
    assert st.flags == Flag.NONE
    assert rec.events == []


def test_concurrent_429s_emit_once_and_keep_the_longest_pause() -> None:
    lim, st, rec = _limiter(Limits())
    lim.throttle(5.0, T0)
    lim.throttle(2.0, T0 + 1)  # shorter: keeps the first pause
    lim.throttle(10.0, T0 + 1)  # longer: extends it
    assert st.throttled_until == pytest.approx(T0 + 11)
    assert rec.kinds() == ["gateway.throttled"]
    # A 429 after the back-off ended (flag not yet cleared lazily) is a new back-off.
    lim.throttle(1.0, T0 + 20)
    assert rec.kinds() == ["gateway.throttled", "gateway.throttled"]


def test_status_reports_tokens_and_remaining_back_off() -> None:
    lim, st, _ = _limiter(Limits(rate=2.0, burst=4, max_in_flight=7))
    lim.take(T0)
    lim.throttle(3.0, T0)
    st.in_flight = 1
    status = lim.status(T0 + 1.0)
    assert status.tokens == pytest.approx(4.0)  # 3 left + 2/s for 1 s, capped at 4
    assert (status.rate, status.burst, status.max_in_flight) == (2.0, 4.0, 7)
    assert status.in_flight == 1
    assert status.throttled_for_s == pytest.approx(2.0)
