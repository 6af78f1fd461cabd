"""What an event becomes on Kafka: its topic, key, value and headers.

Owns: `Record` and `record_of`, the one mapping from an `Event` to a Kafka record, and
`traceparent_now`, which reads the W3C trace context of the code emitting an event.
Must not: send anything or keep state; the sink does.
"""

from __future__ import annotations

from typing import NamedTuple

from proxy.events import Event, Severity, encode
from proxy.spans import current_context

#: Event fields tried in order for an events-topic record's key: the gateway or route it is
#: about, so one consumer partition sees one gateway's story in order.
_KEY_FIELDS = ("gateway", "route", "target", "key")


class Record(NamedTuple):
    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...]
    critical: bool


def key_of(event: Event) -> str | None:
    """The record key: the transaction id for `transaction.*`, else the gateway, route or
    control target the event is about; config events share one key (one ordered story)."""
    fields = event.fields
    if event.kind.startswith("transaction."):
        value = fields.get("transaction_id")
        return value if isinstance(value, str) else None
    for name in _KEY_FIELDS:
        value = fields.get(name)
        if isinstance(value, str) and value:
            return value
    return event.kind.partition(".")[0]


_HEADERS: dict[tuple[str, Severity], tuple[tuple[str, bytes], ...]] = {}


def _headers(kind: str, severity: Severity) -> tuple[tuple[str, bytes], ...]:
    """The kind and severity headers, built once per pair: a handful of kinds, two records
    per payment."""
    found = _HEADERS.get((kind, severity))
    if found is None:
        found = _HEADERS[(kind, severity)] = (
            ("kind", kind.encode()),
            ("severity", severity.name.lower().encode()),
        )
    return found


def record_of(
    event: Event, traceparent: str | None, *, transactions_topic: str, events_topic: str
) -> Record:
    kind = event.kind
    headers = _headers(kind, event.severity)
    if traceparent:
        headers = (*headers, ("traceparent", traceparent.encode()))
    key = key_of(event)
    return Record(
        topic=transactions_topic if kind.startswith("transaction.") else events_topic,
        key=key.encode() if key is not None else None,
        value=encode(event),
        headers=headers,
        critical=event.severity >= Severity.CRITICAL,
    )


def traceparent_now() -> str | None:
    """The W3C `traceparent` of the span current where this is called, or None when there is
    none (tracing off costs a context-variable read)."""
    ctx = current_context()
    if ctx is None:
        return None
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"
