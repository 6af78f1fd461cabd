from __future__ import annotations

import pytest

from proxy.kafka.tail import Filters, format_event


def event(kind: str, severity: str = "info", **fields: object) -> dict[str, object]:
    return {
        "kind": kind,
        "severity": severity,
        "time": "2026-11-30T21:00:00.000Z",
        "fields": fields,
    }


TXN = event(
    "transaction.succeeded", transaction_id="t1", route="deposits", gateway="g1", status=200
)
DUP = event(
    "payment.duplicate_suspected",
    "critical",
    transaction_id="t2",
    route="deposits",
    attempts=[{"gateway": "g1"}, {"gateway": "g2"}],
)
DRAIN = event("control.applied", target="gateway/g2", action="drain", issuer="ops")
DOWN = event("gateway.all_down", "critical", route="payouts", reasons={"g3": "ejected"})


@pytest.mark.parametrize(
    ("filters", "shown"),
    [
        (Filters(), [TXN, DUP, DRAIN, DOWN]),
        (Filters(route="deposits"), [TXN, DUP]),
        (Filters(gateway="g2"), [DUP, DRAIN]),
        (Filters(gateway="g3"), [DOWN]),
        (Filters(severity="critical"), [DUP, DOWN]),
        (Filters(transaction="t1"), [TXN]),
        (Filters(route="deposits", severity="critical"), [DUP]),
    ],
    ids=[
        "all",
        "route",
        "gateway-in-attempts-or-target",
        "gateway-in-reasons",
        "severity",
        "txn",
        "both",
    ],
)
def test_filters(filters: Filters, shown: list[dict[str, object]]) -> None:
    assert [e for e in (TXN, DUP, DRAIN, DOWN) if filters.match(e)] == shown


def test_a_line_reads_left_to_right() -> None:
    line = format_event(event("transaction.failed", transaction_id="t1", route="r", status=502,
                              duration_ms=12.5, region="eu", gateway=None))  # fmt: skip
    assert line.startswith("2026-11-30T21:00:00.000Z INFO     transaction.failed")
    assert "transaction_id=t1 route=r status=502 duration_ms=12.5ms region=eu" in line
    assert "gateway" not in line
    assert format_event(DUP, colour=True).startswith("\033[1;31m")
    assert 'reason="two words"' in format_event(event("x", reason="two words"))
