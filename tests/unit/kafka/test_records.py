from __future__ import annotations

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider

from proxy.events import Event, Severity, make_event
from proxy.kafka.records import key_of, record_of, traceparent_now


def ev(kind: str, severity: Severity = Severity.INFO, **fields: object) -> Event:
    return make_event(kind, severity, 1_700_000_000.0, fields)


@pytest.mark.parametrize(
    ("event", "topic", "key"),
    [
        (ev("transaction.succeeded", transaction_id="t1", route="r", gateway="g"), "T", "t1"),
        (ev("gateway.ejected", Severity.CRITICAL, gateway="g1"), "E", "g1"),
        (ev("gateway.all_down", Severity.CRITICAL, route="deposits"), "E", "deposits"),
        (
            ev(
                "payment.late_success",
                Severity.CRITICAL,
                transaction_id="t",
                gateway="g2",
                route="r",
            ),
            "E",
            "g2",
        ),
        (ev("control.applied", target="gateway/g1"), "E", "gateway/g1"),
        (ev("control.rejected", key="route/x", error="e"), "E", "route/x"),
        (ev("config.loaded", generation=1), "E", "config"),
    ],
    ids=["transaction", "gateway", "route", "payment", "control", "rejected", "config"],
)
def test_topic_and_key(event: Event, topic: str, key: str) -> None:
    rec = record_of(event, None, transactions_topic="T", events_topic="E")
    assert rec.topic == topic
    assert rec.key == key.encode()
    assert key_of(event) == key


def test_value_is_the_event_json_and_headers_say_kind_and_severity() -> None:
    e = ev("gateway.ejected", Severity.CRITICAL, gateway="g1")
    rec = record_of(
        e, "00-" + "1" * 32 + "-" + "2" * 16 + "-01", transactions_topic="T", events_topic="E"
    )
    assert b'"kind":"gateway.ejected"' in rec.value
    headers = dict(rec.headers)
    assert headers["kind"] == b"gateway.ejected"
    assert headers["severity"] == b"critical"
    assert headers["traceparent"].startswith(b"00-1111")
    assert rec.critical


def test_traceparent_is_read_from_the_current_span() -> None:
    assert traceparent_now() is None
    tracer = TracerProvider().get_tracer("test")
    with tracer.start_as_current_span("request") as span:
        ctx = span.get_span_context()
        assert traceparent_now() == (
            f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
        )
    assert trace.get_current_span().get_span_context().is_valid is False
