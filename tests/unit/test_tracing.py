"""Tracing: spans, parents and propagation with an in-memory exporter; the no-op when off."""

from __future__ import annotations

import logging
import sys
import types
from collections.abc import Iterator, Mapping
from typing import Any, ClassVar

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from proxy.tracing import NOOP_SPAN, Tracing
from proxy.tracing_env import propagator_from_env
from tests.unit.upstream.health_support import gateway as make_gateway

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = f"00-{TRACE_ID}-{PARENT_ID}-01"
OTLP_HTTP = "opentelemetry.exporter.otlp.proto.http.trace_exporter"


@pytest.fixture
def exporter() -> InMemorySpanExporter:
    return InMemorySpanExporter()


@pytest.fixture
def tracing(exporter: InMemorySpanExporter) -> Iterator[Tracing]:
    t = Tracing([SimpleSpanProcessor(exporter)])
    yield t
    assert t._provider is not None
    t._provider.shutdown()


def client_headers(**extra: str) -> CIMultiDictProxy[str]:
    """Headers as aiohttp hands them to a handler: case-insensitive, read-only."""
    return CIMultiDictProxy(CIMultiDict({"Content-Type": "application/json", **extra}))


def _attempt(t: Tracing, gateway: str, attempt_id: str, no: int) -> Any:
    return t.attempt_span(
        make_gateway(gateway, port=9443),
        route="deposits",
        region="eu",
        method="POST",
        path_qs="/v1/deposits?x=1",
        attempt_id=attempt_id,
        attempt_no=no,
        transaction_id="txn-1",
    )


def by_name(exporter: InMemorySpanExporter) -> dict[str, ReadableSpan]:
    return {s.name: s for s in exporter.get_finished_spans()}


def hex_ids(span: ReadableSpan) -> tuple[str, str]:
    ctx = span.get_span_context()
    assert ctx is not None
    return trace.format_trace_id(ctx.trace_id), trace.format_span_id(ctx.span_id)


def test_request_span_continues_the_clients_trace(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    headers = client_headers(Traceparent=TRACEPARENT, Tracestate="vendor=abc")
    with tracing.request_span("POST", "deposits", headers) as span:
        assert span.is_recording()

    [server] = exporter.get_finished_spans()
    assert server.name == "POST deposits"
    assert server.kind is SpanKind.SERVER
    assert hex_ids(server)[0] == TRACE_ID
    assert server.parent is not None
    assert server.parent.is_remote
    assert trace.format_span_id(server.parent.span_id) == PARENT_ID
    assert server.get_span_context().trace_state.get("vendor") == "abc"  # type: ignore[union-attr]
    assert server.attributes == {
        "http.request.method": "POST",
        "url.scheme": "http",
        "payswitch.route": "deposits",
    }
    assert server.resource.attributes["service.name"] == "payswitch"


@pytest.mark.parametrize(
    "headers",
    [{}, {"traceparent": "00-not-a-trace-01"}, {"traceparent": f"00-{'0' * 32}-{PARENT_ID}-01"}],
    ids=["absent", "malformed", "all-zero-trace-id"],
)
def test_request_span_starts_a_new_trace_without_a_valid_parent(
    tracing: Tracing, exporter: InMemorySpanExporter, headers: dict[str, str]
) -> None:
    with tracing.request_span("GET", "lookups", client_headers(**headers)):
        pass
    [server] = exporter.get_finished_spans()
    assert server.parent is None
    assert hex_ids(server)[0] != "0" * 32


@pytest.mark.parametrize(
    ("method", "route", "name", "attributes"),
    [
        ("GET", None, "GET", {"http.request.method": "GET", "url.scheme": "http"}),
        (
            "BREW",
            "coffee",
            "_OTHER coffee",
            {
                "http.request.method": "_OTHER",
                "http.request.method_original": "BREW",
                "url.scheme": "http",
                "payswitch.route": "coffee",
            },
        ),
    ],
    ids=["no-route", "unknown-method"],
)
def test_request_span_names_stay_low_cardinality(
    tracing: Tracing,
    exporter: InMemorySpanExporter,
    method: str,
    route: str | None,
    name: str,
    attributes: dict[str, str],
) -> None:
    with tracing.request_span(method, route, client_headers()):
        pass
    [server] = exporter.get_finished_spans()
    assert server.name == name
    assert dict(server.attributes or {}) == attributes


def test_attempts_are_client_children_and_inject_points_upstream_at_them(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    upstream: dict[str, dict[str, str]] = {}
    incoming = client_headers(traceparent=TRACEPARENT, tracestate="vendor=abc")
    with tracing.request_span("POST", "deposits", incoming):
        for no, gateway in enumerate(["eu1", "eu2"], start=1):
            with _attempt(tracing, gateway, f"att-{no}", no):
                # The forwarder copies the client's headers; inject must replace, not add.
                headers = {"Traceparent": TRACEPARENT, "X-Request-Id": "r1"}
                tracing.inject(headers)
                upstream[gateway] = headers

    spans = by_name(exporter)
    server = spans["POST deposits"]
    for no, gateway in enumerate(["eu1", "eu2"], start=1):
        attempt = spans[f"attempt {gateway}"]
        assert attempt.kind is SpanKind.CLIENT
        assert attempt.parent is not None
        assert attempt.parent.span_id == server.get_span_context().span_id  # type: ignore[union-attr]
        trace_id, span_id = hex_ids(attempt)
        assert trace_id == TRACE_ID
        sent = upstream[gateway]
        assert sent.keys() == {"traceparent", "tracestate", "X-Request-Id"}
        assert sent["traceparent"] == f"00-{TRACE_ID}-{span_id}-01"
        assert sent["tracestate"] == "vendor=abc"
        assert attempt.attributes is not None
        assert attempt.attributes["payswitch.gateway"] == gateway
        assert attempt.attributes["payswitch.attempt_id"] == f"att-{no}"
        assert attempt.attributes["payswitch.attempt_no"] == no
    assert "http.request.resend_count" not in (spans["attempt eu1"].attributes or {})
    assert (spans["attempt eu2"].attributes or {})["http.request.resend_count"] == 1


def test_inject_outside_any_span_leaves_the_headers_alone(tracing: Tracing) -> None:
    headers = {"traceparent": TRACEPARENT}
    tracing.inject(headers)
    assert headers == {"traceparent": TRACEPARENT}


@pytest.mark.parametrize(
    ("status", "outcome", "error", "code", "error_type"),
    [
        (200, "success", None, StatusCode.UNSET, None),
        (402, "success", None, StatusCode.UNSET, None),
        (429, "throttled", None, StatusCode.UNSET, None),
        (503, "server_error", None, StatusCode.ERROR, "server_error"),
        (None, "timeout", None, StatusCode.ERROR, "timeout"),
        (None, "cancelled", False, StatusCode.UNSET, None),
        (200, "bad_response", True, StatusCode.ERROR, "bad_response"),
    ],
    ids=["ok", "decline", "throttled", "5xx", "no-response", "cancelled", "caller-says-error"],
)
def test_record_outcome(
    tracing: Tracing,
    exporter: InMemorySpanExporter,
    status: int | None,
    outcome: str,
    error: bool | None,
    code: StatusCode,
    error_type: str | None,
) -> None:
    with _attempt(tracing, "eu1", "att-1", 1) as span:
        tracing.record_outcome(span, status, outcome, error=error)
    [attempt] = exporter.get_finished_spans()
    attributes = dict(attempt.attributes or {})
    assert attempt.status.status_code is code
    assert attributes.get("http.response.status_code") == status
    assert attributes["payswitch.outcome"] == outcome
    assert attributes.get("error.type") == error_type


def test_an_exception_in_the_request_marks_its_span_failed(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with pytest.raises(RuntimeError), tracing.request_span("POST", "deposits", client_headers()):
        raise RuntimeError("boom")
    [server] = exporter.get_finished_spans()
    assert server.status.status_code is StatusCode.ERROR


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"OTEL_TRACES_EXPORTER": "none"},
        {"OTEL_TRACES_EXPORTER": " "},
        {"OTEL_SDK_DISABLED": "true", "OTEL_TRACES_EXPORTER": "console"},
        {"OTEL_SDK_DISABLED": "TRUE ", "OTEL_TRACES_EXPORTER": "otlp"},
        {"OTEL_TRACES_EXPORTER": "zipkin"},
    ],
    ids=["unset", "none", "blank", "sdk-disabled", "sdk-disabled-case", "unsupported"],
)
async def test_off_uses_only_shared_no_op_objects(env: dict[str, str]) -> None:
    t = Tracing.from_env(env)
    assert t.enabled is False
    assert t._provider is None
    assert t.request_span("POST", "deposits", client_headers(traceparent=TRACEPARENT)) is NOOP_SPAN
    assert _attempt(t, "eu1", "att-1", 1) is NOOP_SPAN
    with NOOP_SPAN as span:
        assert span is trace.INVALID_SPAN
        t.record_outcome(span, 503, "server_error")
        headers = {"traceparent": TRACEPARENT}
        t.inject(headers)
        # Off means transparent: the client's own trace headers go upstream untouched.
        assert headers == {"traceparent": TRACEPARENT}
    await t.close()


class FakeOTLPExporter(InMemorySpanExporter):
    """Stands in for the optional OTLP package; remembers how it was built."""

    built: ClassVar[list[FakeOTLPExporter]] = []

    def __init__(self, **kwargs: Any) -> None:
        super().__init__()
        self.kwargs = kwargs
        FakeOTLPExporter.built.append(self)


@pytest.fixture
def fake_otlp(monkeypatch: pytest.MonkeyPatch) -> type[FakeOTLPExporter]:
    module = types.ModuleType(OTLP_HTTP)
    module.OTLPSpanExporter = FakeOTLPExporter  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, OTLP_HTTP, module)
    FakeOTLPExporter.built = []
    return FakeOTLPExporter


@pytest.mark.parametrize(
    ("env", "kwargs"),
    [
        ({}, {}),
        (
            {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318/"},
            {"endpoint": "http://127.0.0.1:4318/v1/traces"},
        ),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:9999/t",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-tenant=a%20b,authorization=Bearer%20t",
            },
            {
                "endpoint": "http://127.0.0.1:9999/t",
                "headers": {"x-tenant": "a b", "authorization": "Bearer t"},
            },
        ),
    ],
    ids=["defaults", "base-endpoint-gets-signal-path", "traces-endpoint-and-headers"],
)
async def test_otlp_exporter_is_built_from_env(
    fake_otlp: type[FakeOTLPExporter], env: dict[str, str], kwargs: dict[str, object]
) -> None:
    t = Tracing.from_env({"OTEL_TRACES_EXPORTER": "otlp", **env})
    try:
        assert t.enabled
        [built] = fake_otlp.built
        assert built.kwargs == kwargs
    finally:
        await t.close()


async def test_close_flushes_the_batch_and_turns_tracing_off(
    fake_otlp: type[FakeOTLPExporter],
) -> None:
    env = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_SERVICE_NAME": "payswitch-eu",
        "OTEL_RESOURCE_ATTRIBUTES": "service.name=ignored,deployment.environment=prod",
        "OTEL_BSP_SCHEDULE_DELAY": "60000",  # nothing leaves before close() flushes
    }
    t = Tracing.from_env(env)
    with t.request_span("POST", "deposits", client_headers()):
        pass
    [exporter] = fake_otlp.built
    assert exporter.get_finished_spans() == ()
    await t.close()
    [span] = exporter.get_finished_spans()
    assert span.resource.attributes["service.name"] == "payswitch-eu"
    assert span.resource.attributes["deployment.environment"] == "prod"
    assert t.enabled is False
    assert t.request_span("POST", "deposits", client_headers()) is NOOP_SPAN
    await t.close()  # idempotent


@pytest.mark.parametrize(
    ("sampler", "arg", "exported"),
    [
        ("always_off", None, 0),
        ("traceidratio", "0", 0),
        ("parentbased_traceidratio", "1", 1),
        ("always_on", None, 1),
        ("bogus", None, 1),
    ],
    ids=["always-off", "ratio-zero", "ratio-one", "always-on", "unknown-samples-all"],
)
async def test_sampler_from_env(
    fake_otlp: type[FakeOTLPExporter], sampler: str, arg: str | None, exported: int
) -> None:
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_TRACES_SAMPLER": sampler}
    if arg is not None:
        env["OTEL_TRACES_SAMPLER_ARG"] = arg
    t = Tracing.from_env(env)
    headers: dict[str, str] = {}
    with t.request_span("POST", "deposits", client_headers()):
        t.inject(headers)
    await t.close()
    [exporter] = fake_otlp.built
    assert len(exporter.get_finished_spans()) == exported
    # Sampled out or not, the trace still propagates to the gateway.
    sampled = int(headers["traceparent"].rsplit("-", 1)[1], 16) & 0x01
    assert sampled == exported


async def test_otlp_without_its_package_warns_and_stays_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, OTLP_HTTP, None)  # makes the import fail
    with caplog.at_level(logging.WARNING, logger="proxy.tracing_env"):
        t = Tracing.from_env({"OTEL_TRACES_EXPORTER": "otlp"})
    assert t.enabled is False
    assert "opentelemetry-exporter-otlp-proto-http is not installed" in caplog.text
    await t.close()


async def test_console_alongside_missing_otlp_still_traces(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(sys.modules, OTLP_HTTP, None)
    t = Tracing.from_env({"OTEL_TRACES_EXPORTER": "otlp, console"})
    assert t.enabled is True
    await t.close()


def test_unknown_otlp_protocol_stays_off(fake_otlp: type[FakeOTLPExporter]) -> None:
    env: Mapping[str, str] = {
        "OTEL_TRACES_EXPORTER": "otlp",
        "OTEL_EXPORTER_OTLP_PROTOCOL": "http/json",
    }
    assert Tracing.from_env(env).enabled is False
    assert fake_otlp.built == []


def test_attempt_spans_carry_semantic_convention_and_payswitch_attributes(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with _attempt(tracing, "eu1", "att-1", 1):
        pass
    [span] = exporter.get_finished_spans()
    assert dict(span.attributes or {}) == {
        "http.request.method": "POST",
        "server.address": "127.0.0.1",
        "server.port": 9443,
        "url.full": "http://127.0.0.1:9443/v1/deposits?x=1",
        "payswitch.gateway": "eu1",
        "payswitch.provider": "eu1",
        "payswitch.route": "deposits",
        "payswitch.region": "eu",
        "payswitch.attempt_id": "att-1",
        "payswitch.attempt_no": 1,
        "payswitch.transaction_id": "txn-1",
    }


def test_request_span_carries_path_region_and_transaction(
    tracing: Tracing, exporter: InMemorySpanExporter
) -> None:
    with tracing.request_span(
        "POST", "deposits", client_headers(), path="/v1/deposits", region="eu", transaction_id="t1"
    ):
        pass
    [span] = exporter.get_finished_spans()
    attributes = dict(span.attributes or {})
    assert attributes["url.path"] == "/v1/deposits"
    assert attributes["url.scheme"] == "http"
    assert attributes["payswitch.region"] == "eu"
    assert attributes["payswitch.transaction_id"] == "t1"


@pytest.mark.parametrize(
    "env",
    [
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"},
        {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://127.0.0.1:4318/v1/traces"},
    ],
    ids=["generic-endpoint", "traces-endpoint"],
)
async def test_an_otlp_endpoint_alone_turns_otlp_on(env: dict[str, str]) -> None:
    t = Tracing.from_env(env)
    assert t.enabled is True
    await t.close()


async def test_an_explicit_none_wins_over_an_endpoint() -> None:
    t = Tracing.from_env(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318", "OTEL_TRACES_EXPORTER": "none"}
    )
    assert t.enabled is False


def test_baggage_propagates_when_configured(exporter: InMemorySpanExporter) -> None:
    t = Tracing([SimpleSpanProcessor(exporter)], propagator=propagator_from_env({}))
    headers: dict[str, str] = {}
    with t.request_span("POST", "deposits", client_headers(traceparent=TRACEPARENT, baggage="k=v")):
        t.inject(headers)
    assert headers["baggage"] == "k=v"
    assert headers["traceparent"].split("-")[1] == TRACE_ID
