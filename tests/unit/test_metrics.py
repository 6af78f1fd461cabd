"""Request-path metrics: plain counts turned into Prometheus families at scrape time."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from proxy.metrics import Metrics


def sample(registry: CollectorRegistry, name: str, labels: dict[str, str]) -> float | None:
    return registry.get_sample_value(name, labels)


@pytest.mark.parametrize(
    ("seconds", "first_le"),
    [(0.005, "0.005"), (0.0051, "0.01"), (2.5, "2.5"), (11.0, "+Inf")],
    ids=["on-a-bound", "just-above", "upper-bound", "beyond-all"],
)
def test_histogram_buckets_are_cumulative_and_inclusive(seconds: float, first_le: str) -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    m.request("deposits", "g1", "2xx", seconds)
    labels = {"route": "deposits", "gateway": "g1", "outcome": "2xx"}
    les = [
        "0.005",
        "0.01",
        "0.025",
        "0.05",
        "0.1",
        "0.25",
        "0.5",
        "1.0",
        "2.5",
        "5.0",
        "10.0",
        "+Inf",
    ]
    counts = [
        sample(registry, "payswitch_request_duration_seconds_bucket", {**labels, "le": le})
        for le in les
    ]
    assert counts == [0.0] * les.index(first_le) + [1.0] * (len(les) - les.index(first_le))
    assert sample(registry, "payswitch_requests_total", labels) == 1.0
    assert sample(registry, "payswitch_request_duration_seconds_sum", labels) == pytest.approx(
        seconds
    )


def test_attempts_and_retries_are_counted_by_their_labels() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    for outcome in ("timeout", "timeout", "success"):
        m.attempt("deposits", "g1", outcome, 0.3)
    m.retry("deposits", "timeout")
    assert (
        sample(
            registry,
            "payswitch_attempts_total",
            {"route": "deposits", "gateway": "g1", "outcome": "timeout"},
        )
        == 2.0
    )
    assert (
        sample(
            registry,
            "payswitch_attempt_duration_seconds_count",
            {"route": "deposits", "gateway": "g1", "outcome": "success"},
        )
        == 1.0
    )
    assert (
        sample(registry, "payswitch_retries_total", {"route": "deposits", "reason": "timeout"})
        == 1.0
    )
