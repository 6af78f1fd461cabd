"""OTEL_* variables to tracing parts: exporter choice, propagators, resource, sampler."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, DEFAULT_ON, ParentBasedTraceIdRatio

from proxy.tracing_env import exporter_names, propagator_from_env, resource, sampler


@pytest.mark.parametrize(
    ("env", "names"),
    [
        ({}, []),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://c:4318/v1/traces"}, ["otlp"]),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318", "OTEL_TRACES_EXPORTER": "none"}, []),
        ({"OTEL_TRACES_EXPORTER": "Console, otlp"}, ["console", "otlp"]),
    ],
    ids=["nothing", "endpoint-alone", "traces-endpoint-alone", "none-wins", "explicit-list"],
)
def test_exporter_names(env: dict[str, str], names: list[str]) -> None:
    assert exporter_names(env) == names


@pytest.mark.parametrize(
    ("value", "fields"),
    [
        (None, {"traceparent", "tracestate", "baggage"}),
        ("tracecontext", {"traceparent", "tracestate"}),
        ("baggage", {"baggage"}),
        ("none", set()),
        ("tracecontext,not-installed", {"traceparent", "tracestate"}),
    ],
    ids=["default", "tracecontext", "baggage", "none", "unknown-skipped"],
)
def test_otel_propagators_choose_the_propagators(value: str | None, fields: set[str]) -> None:
    env = {} if value is None else {"OTEL_PROPAGATORS": value}
    assert set(propagator_from_env(env).fields) == fields


def test_resource_follows_the_spec_precedence() -> None:
    env = {
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,deployment.environment=prod%20eu",
        "OTEL_SERVICE_NAME": "payswitch-eu",
    }
    attributes = resource(env).attributes
    assert attributes["service.name"] == "payswitch-eu"
    assert attributes["deployment.environment"] == "prod eu"
    assert resource({}).attributes["service.name"] == "payswitch"


@pytest.mark.parametrize(
    ("env", "expect"),
    [
        ({}, DEFAULT_ON),
        ({"OTEL_TRACES_SAMPLER": "always_off"}, ALWAYS_OFF),
        ({"OTEL_TRACES_SAMPLER": "nonsense"}, DEFAULT_ON),
    ],
    ids=["default", "always-off", "unknown"],
)
def test_sampler(env: dict[str, str], expect: object) -> None:
    assert sampler(env) is expect


def test_ratio_sampler_takes_its_argument() -> None:
    s = sampler(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.25"}
    )
    assert isinstance(s, ParentBasedTraceIdRatio)
    assert "0.25" in s.get_description()  # type: ignore[no-untyped-call]
