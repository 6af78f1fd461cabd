"""The event kinds payswitch emits: their severity and the fields each must carry.

Owns: `Severity` and the `KINDS` table, which schemas/event.schema.json mirrors (a test
holds the two together), and `problems`, which says what an emission lacks.
Must not: emit or deliver anything; proxy.events does.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType


class Severity(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50


@dataclass(frozen=True, slots=True, kw_only=True)
class KindSpec:
    """What one event kind is: its usual severity and the fields it must carry."""

    severity: Severity
    required: tuple[str, ...]


_TRANSACTION = (
    "transaction_id",
    "route",
    "region",
    "gateway",
    "attempt_id",
    "attempts",
    "status",
    "duration_ms",
)

#: Every event kind the proxy emits. schemas/event.schema.json says the same thing for
#: consumers; a unit test keeps the two in step.
KINDS: Mapping[str, KindSpec] = MappingProxyType(
    {
        "config.loaded": KindSpec(
            severity=Severity.INFO,
            required=("generation", "hash", "files", "gateways", "routes"),
        ),
        "config.rejected": KindSpec(severity=Severity.ERROR, required=("issues", "trigger")),
        "gateway.ejected": KindSpec(
            severity=Severity.CRITICAL, required=("gateway", "source", "reason", "duration_s")
        ),
        "gateway.restored": KindSpec(
            severity=Severity.INFO, required=("gateway", "source", "reason")
        ),
        "gateway.degraded": KindSpec(
            severity=Severity.WARNING, required=("gateway", "score", "reason")
        ),
        "gateway.recovered": KindSpec(severity=Severity.INFO, required=("gateway", "score")),
        "gateway.all_down": KindSpec(
            severity=Severity.CRITICAL, required=("route", "region", "reasons")
        ),
        "gateway.throttled": KindSpec(
            severity=Severity.WARNING, required=("gateway", "retry_after_s")
        ),
        "gateway.drained": KindSpec(severity=Severity.INFO, required=("gateway",)),
        "gateway.undrained": KindSpec(severity=Severity.INFO, required=("gateway",)),
        "transaction.pending": KindSpec(severity=Severity.INFO, required=_TRANSACTION),
        "transaction.succeeded": KindSpec(severity=Severity.INFO, required=_TRANSACTION),
        "transaction.failed": KindSpec(severity=Severity.INFO, required=_TRANSACTION),
        "transaction.unknown": KindSpec(severity=Severity.INFO, required=_TRANSACTION),
        "payment.duplicate_suspected": KindSpec(
            severity=Severity.CRITICAL, required=("transaction_id", "route", "attempts")
        ),
        "payment.late_success": KindSpec(
            severity=Severity.CRITICAL,
            required=("transaction_id", "route", "attempt_id", "gateway", "status"),
        ),
        "control.applied": KindSpec(
            severity=Severity.INFO,
            required=("target", "action", "issuer", "reason", "expires_at"),
        ),
        "control.rejected": KindSpec(severity=Severity.WARNING, required=("key", "error")),
        "control.expired": KindSpec(
            severity=Severity.INFO, required=("target", "action", "issuer")
        ),
        "store.down": KindSpec(severity=Severity.CRITICAL, required=("op", "error")),
        "store.up": KindSpec(severity=Severity.INFO, required=("down_s",)),
        "worker.restarted": KindSpec(
            severity=Severity.ERROR, required=("worker", "pid", "previous_pid", "exit", "ran_s")
        ),
    }
)


def problems(kind: str, fields: Mapping[str, object]) -> tuple[str, ...]:
    """What is wrong with emitting `kind` with `fields`; empty when nothing is."""
    spec = KINDS.get(kind)
    if spec is None:
        return (f"unknown event kind {kind!r}",)
    missing = [f for f in spec.required if f not in fields]
    if missing:
        return (f"{kind} is missing {', '.join(missing)}",)
    return ()
