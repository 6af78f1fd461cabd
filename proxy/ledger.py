"""What became of a payment after its client was answered: duplicates and late successes.

Owns: judging, from attempt events, whether a payment may have been charged twice
(`payment.duplicate_suspected`, critical unless the provider dedupes the forwarded key) or
was charged after the client was told it failed or was unknown (`payment.late_success`),
and recording both on the transaction and in metrics.
Fed by two events: `settled` (the client was answered) and `late_result` (an attempt left
running ended afterwards).
Must not: change what the client was told, send anything, or block: records are written
off the request path.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from proxy.events import Emitter, Severity
from proxy.forward import Reply
from proxy.metrics import Metrics
from proxy.payments import Payments

if TYPE_CHECKING:
    from proxy.attempt import Attempt, Result
    from proxy.retry import Dispatch

logger = logging.getLogger(__name__)

#: Kinds of late result counted per route; present from the start so alerts see the first.
LATE_KINDS = ("duplicate_suspected", "duplicate_deduped", "late_success")


class PaymentsLedger:
    def __init__(self, metrics: Metrics, events: Emitter, payments: Payments) -> None:
        self.metrics = metrics
        self.events = events
        self.payments = payments

    def track_route(self, route: str) -> None:
        for kind in LATE_KINDS:
            self.metrics.late_results.labels(route, kind)

    def settled(self, dispatch: Dispatch) -> None:
        """The client was answered: report attempts that may have charged it a second time.

        A sent attempt with no definitive answer, on a provider that cannot recognise it as
        the same payment as the winner, may have been charged too. Attempts still running
        are judged when they end (`late_result`).
        """
        winner = dispatch.winner
        if dispatch.idempotent or dispatch.client_outcome != "success" or winner is None:
            return
        for att in dispatch.attempts:
            if att is winner or not att.unresolved or status_of(att) is not None:
                continue  # a gateway that answered (even 5xx) said what it did
            if att.task is not None and not att.task.done():
                continue
            if not dispatch.dedupes(att, winner):
                self._duplicate(dispatch, winner, att, None, "ambiguous")

    def late_result(self, dispatch: Dispatch, att: Attempt, result: Result) -> None:
        """An attempt left running ended after its request was answered."""
        if dispatch.idempotent:
            return
        winner = dispatch.winner
        success = dispatch.client_outcome == "success" and winner is not None
        if isinstance(result, Reply):
            if result.status >= 300:
                return  # a definitive refusal: nothing was charged
            if success and winner is not None:
                reason = (
                    "both_succeeded_deduped" if dispatch.dedupes(att, winner) else "both_succeeded"
                )
                self._duplicate(dispatch, winner, att, result.status, reason)
            else:
                self._late_success(dispatch, att, result.status)
        elif success and winner is not None and not dispatch.dedupes(att, winner):
            self._duplicate(dispatch, winner, att, None, "unresolved")

    def _duplicate(
        self, dispatch: Dispatch, winner: Attempt, att: Attempt, status: int | None, reason: str
    ) -> None:
        route = dispatch.req.plan.name
        # Both answered, but the same provider saw the same key: it should have charged
        # once. Still reported, below the paging threshold, so reconciliation can check.
        deduped = reason == "both_succeeded_deduped"
        kind = "duplicate_deduped" if deduped else "duplicate_suspected"
        self.metrics.late_results.labels(route, kind).inc()
        self.payments.record_late(dispatch, kind, att, status)
        self.events.emit(
            "payment.duplicate_suspected",
            Severity.WARNING if deduped else Severity.CRITICAL,
            transaction_id=dispatch.req.transaction_id,
            route=route,
            reason=reason,
            attempts=[
                {
                    "attempt_id": winner.attempt_id,
                    "gateway": winner.gateway.name,
                    "status": status_of(winner),
                },
                {"attempt_id": att.attempt_id, "gateway": att.gateway.name, "status": status},
            ],
        )

    def _late_success(self, dispatch: Dispatch, att: Attempt, status: int) -> None:
        route = dispatch.req.plan.name
        self.metrics.late_results.labels(route, "late_success").inc()
        self.payments.record_late(dispatch, "late_success", att, status)
        self.events.emit(
            "payment.late_success",
            Severity.CRITICAL,
            transaction_id=dispatch.req.transaction_id,
            route=route,
            attempt_id=att.attempt_id,
            gateway=att.gateway.name,
            status=status,
        )


def status_of(att: Attempt) -> int | None:
    """The status an attempt's gateway answered, when it did."""
    task = att.task
    if task is None or not task.done() or task.cancelled():
        return None
    result = task.result()
    return result.status if isinstance(result, Reply) else None
