"""Request-path metrics: plain counts turned into Prometheus families at scrape time."""

from __future__ import annotations

import os

import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import CollectorRegistry

from proxy.metrics import Metrics, register_process_collectors, render


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


def test_exemplars_link_latency_buckets_to_the_sampled_trace_in_openmetrics_only() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry, exemplars=True)
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("t")
    with tracer.start_as_current_span("request") as span:
        m.request("deposits", "g1", "2xx", 0.02)
        trace_id = format(span.get_span_context().trace_id, "032x")
    m.request("deposits", "g1", "2xx", 0.02)  # outside any span: keeps the last exemplar
    om, om_type = render(registry, "application/openmetrics-text; version=1.0.0")
    assert om_type.startswith("application/openmetrics-text")
    [line] = [
        x for x in om.decode().splitlines() if "request_duration_seconds_bucket" in x and "# {" in x
    ]
    assert 'le="0.025"' in line and f'trace_id="{trace_id}"' in line
    text, text_type = render(registry, "text/plain")
    assert text_type.startswith("text/plain") and b"trace_id" not in text


def test_no_exemplars_when_tracing_is_off() -> None:
    registry = CollectorRegistry()
    m = Metrics(registry)
    tracer = TracerProvider(shutdown_on_exit=False).get_tracer("t")
    with tracer.start_as_current_span("request"):
        m.request("deposits", "g1", "2xx", 0.02)
    om, _ = render(registry, "application/openmetrics-text")
    assert b"trace_id" not in om


@pytest.mark.parametrize(
    ("accept", "expect"),
    [
        (None, "text/plain"),
        ("*/*", "text/plain"),
        ("application/openmetrics-text;version=1.0.0,text/plain;q=0.5", "application/openmetrics"),
    ],
    ids=["no-accept", "anything", "prometheus-scraper"],
)
def test_exposition_format_follows_accept(accept: str | None, expect: str) -> None:
    _, content_type = render(CollectorRegistry(), accept)
    assert content_type.startswith(expect)


def test_process_platform_and_build_info() -> None:
    registry = CollectorRegistry()
    register_process_collectors(registry)
    assert (sample(registry, "process_resident_memory_bytes", {}) or 0) > 0
    assert (sample(registry, "process_open_fds", {}) or 0) > 0
    names = {m.name for m in registry.collect()}
    assert {"python_info", "payswitch_build"} <= names
    [build] = [m for m in registry.collect() if m.name == "payswitch_build"]
    [s] = build.samples
    assert s.name == "payswitch_build_info" and s.value == 1
    assert set(s.labels) == {"version", "build", "python_version"}
    assert s.labels["build"] == (
        "native" if os.environ.get("PAYSWITCH_NATIVE") == "1" else "python"
    )
