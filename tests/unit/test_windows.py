"""Rolling windows: rates, success and quantiles as PromQL computes them; gateway since."""

from __future__ import annotations

from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import ManualClock
from proxy.metrics import BUCKETS, Metrics
from proxy.upstream.state import Flag, GatewayState
from proxy.windows import Windows, is_failure, quantile
from tests.unit.upstream.health_support import gateway


def _gateways(windows: Windows) -> Any:
    return windows.view()["gateways"]


@pytest.mark.parametrize(
    ("q", "counts", "expect"),
    [
        (0.5, [0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0.0075),
        (0.5, [4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0.0025),
        (0.99, [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 3], BUCKETS[-1]),
        (0.99, [99, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1], 0.005),
        (0.5, [0] * 12, None),
    ],
    ids=["inside-a-bucket", "first-bucket-from-zero", "all-in-inf", "rank-on-a-bound", "empty"],
)
def test_quantile_is_histogram_quantile(q: float, counts: list[int], expect: float | None) -> None:
    got = quantile(q, counts)
    assert got == (pytest.approx(expect) if expect is not None else None)


@pytest.mark.parametrize(
    ("outcome", "failed"),
    [
        ("2xx", False),
        ("4xx", False),
        ("5xx", True),
        ("no-gateway-available", True),
        ("outcome-unknown", True),
        ("bad-request", False),
        ("client-closed", False),
        ("something-new", True),
    ],
)
def test_failures_are_5xx_answers(outcome: str, failed: bool) -> None:
    assert is_failure(outcome) is failed


def test_windows_rate_success_and_latency_over_one_and_five_minutes() -> None:
    clock = ManualClock()
    metrics = Metrics(CollectorRegistry())
    windows = Windows(metrics, [], clock=clock)
    windows.sample()
    for _ in range(240):  # four minutes: 1 request/s, the last 60 s all failing
        clock.advance(1.0)
        metrics.request("deposits", "g1", "2xx" if clock.now() < 1180.5 else "5xx", 0.02)
        windows.sample()
    routes: Any = windows.view()["routes"]
    [route] = routes
    one, five = route["1m"], route["5m"]
    assert one["requests"] == 60 and one["success_rate"] == 0.0
    assert one["rate"] == pytest.approx(1.0, rel=0.05)
    assert five["requests"] == 240 and five["success_rate"] == pytest.approx(0.75)
    assert five["p50_ms"] == pytest.approx(17.5)


def test_gateway_status_since_and_reason_follow_flag_changes() -> None:
    clock = ManualClock()
    st = GatewayState(gateway("g1"))
    windows = Windows(Metrics(CollectorRegistry()), [st], clock=clock)
    windows.attach(st)
    clock.advance(10)
    st.set_flag(Flag.DEGRADED, "latency 2x baseline")
    clock.advance(5)
    st.set_flag(Flag.EJECTED, "5 consecutive failures")
    view = _gateways(windows)[0]
    assert (view["status"], view["reason"], view["up"]) == (
        "ejected",
        "5 consecutive failures",
        False,
    )
    assert view["since"] == clock.wall()
    clock.advance(5)
    st.clear_flag(Flag.EJECTED, "ejection over")
    view = _gateways(windows)[0]
    assert (view["status"], view["reason"], view["up"]) == ("degraded", "latency 2x baseline", True)
    assert view["since"] == clock.wall() - 10
