"""Tests for proxy.ledger: every branch of duplicate-suspected / late-success judging,
over real attempts whose exchanges ended with real replies or failures."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import MappingProxyType

import pytest
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry

from proxy.attempt import Attempt, End, Result
from proxy.clock import ManualClock
from proxy.config.load import build_rules
from proxy.events import RecordingEmitter
from proxy.forward import AttemptFailed, Forwarder, Reply, new_session
from proxy.idempotency import MemoryIdempotencyStore, MemoryTransactionStore
from proxy.ledger import PaymentsLedger, status_of
from proxy.metrics import Metrics
from proxy.outbound import Outbound, Parts
from proxy.payments import Payments
from proxy.retry import Dispatch
from proxy.routing import Router, compile_router
from proxy.upstream.balancer import Balancer
from proxy.upstream.health import Health
from proxy.upstream.phase import Progress
from proxy.upstream.state import GatewayState, Outcome, StateRegistry

RULES = b"""
gateways:
  s1: {url: 'http://127.0.0.1:9', region: eu, provider: stripe}
  s2: {url: 'http://127.0.0.1:9', region: eu, provider: stripe}
  a1: {url: 'http://127.0.0.1:9', region: eu, provider: adyen}
routes:
  - name: deposits
    match: {path_prefix: /v1/deposits}
    region: {default: eu}
    gateways: [s1, s2, a1]
"""


@dataclass
class World:
    ledger: PaymentsLedger
    events: RecordingEmitter
    registry: CollectorRegistry
    parts: Parts
    states: StateRegistry
    router: Router

    def dispatch(self, method: str = "POST", *, key: bool = True) -> Dispatch:
        router = self.router
        plan = router.match_without_body(method, "/v1/deposits", CIMultiDictProxy(CIMultiDict()))
        assert plan is not None
        req = Outbound(
            plan=plan,
            region="eu",
            method=method,
            path_qs="/v1/deposits",
            headers=CIMultiDict(),
            body=b"",
            transaction_id="t-1",
            attempt_header="X-Payswitch-Attempt-Id",
            transaction_header="X-Payswitch-Transaction-Id",
            has_key=key,
            states=router.states,
        )
        return Dispatch(req, self.parts)

    def late(self, kind: str) -> float:
        value = self.registry.get_sample_value(
            "payswitch_payment_late_results_total", {"route": "deposits", "kind": kind}
        )
        return value or 0.0


@pytest.fixture
async def world() -> AsyncIterator[World]:
    rules = build_rules([("rules.yaml", RULES)])
    router = compile_router(rules)
    states = StateRegistry()
    states.reconcile(rules.gateways)
    router.states = MappingProxyType({n: states[n] for n in rules.gateways})
    registry = CollectorRegistry()
    metrics = Metrics(registry)
    events = RecordingEmitter()
    clock = ManualClock()
    payments = Payments(
        MemoryIdempotencyStore(clock=clock), MemoryTransactionStore(clock=clock), metrics
    )
    session = new_session()
    parts = Parts(
        balancer=Balancer(states),
        health=Health(states, clock=clock),
        forwarder=Forwarder(session),
        clock=clock,
    )
    ledger = PaymentsLedger(metrics, events, payments)
    ledger.track_route("deposits")
    yield World(ledger, events, registry, parts, states, router)
    await session.close()
    await asyncio.sleep(0)


def attempt(w: World, gateway: str, end: End, result: Result | None) -> Attempt:
    st: GatewayState = w.states[gateway]
    att = Attempt(attempt_id=f"a-{gateway}", state=st, started=0.0, progress=Progress(), end=end)
    if result is not None:
        fut: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        fut.set_result(result)
        att.task = fut
    return att


def reply(status: int) -> Reply:
    return Reply(status, CIMultiDictProxy(CIMultiDict()), b"")


TIMEOUT = AttemptFailed(Outcome.TIMEOUT, "timed out", sent=True)


@pytest.mark.parametrize(
    ("method", "key", "other", "other_end", "other_result", "expected"),
    [
        ("POST", True, "a1", End.ABANDONED, TIMEOUT, "duplicate_suspected"),
        ("POST", True, "s1", End.ABANDONED, TIMEOUT, None),  # same provider dedupes the key
        ("POST", False, "s1", End.ABANDONED, TIMEOUT, "duplicate_suspected"),  # no key
        (
            "POST",
            True,
            "a1",
            End.UNSENT,
            AttemptFailed(Outcome.CONNECT_FAILURE, "", sent=False),
            None,
        ),
        ("POST", True, "a1", End.AMBIGUOUS, reply(503), None),  # the gateway said what it did
        ("POST", True, "a1", End.ABANDONED, None, None),  # still running: judged when it ends
        ("PUT", True, "a1", End.ABANDONED, TIMEOUT, None),  # idempotent: nothing to fear
    ],
    ids=[
        "other-provider",
        "same-provider-deduped",
        "no-key",
        "unsent",
        "answered-5xx",
        "still-running",
        "idempotent",
    ],
)
async def test_settled_reports_attempts_that_may_have_charged_twice(
    world: World,
    method: str,
    key: bool,
    other: str,
    other_end: End,
    other_result: Result | None,
    expected: str | None,
) -> None:
    d = world.dispatch(method, key=key)
    first = attempt(world, other, other_end, other_result)
    if other_result is None:
        first.task = asyncio.get_running_loop().create_future()
    winner = attempt(world, "s2", End.ANSWERED, reply(200))
    d.attempts += [first, winner]
    d.winner, d.client_outcome = winner, "success"
    world.ledger.settled(d)
    kinds = [e.fields["reason"] for e in world.events.of("payment.duplicate_suspected")]
    assert kinds == ([] if expected is None else ["ambiguous"])
    assert world.late("duplicate_suspected") == (1.0 if expected else 0.0)
    if first.task is not None and not first.task.done():
        first.task.cancel()


async def test_settled_ignores_requests_that_did_not_succeed(world: World) -> None:
    d = world.dispatch()
    att = attempt(world, "a1", End.ABANDONED, TIMEOUT)
    d.attempts.append(att)
    d.client_outcome = "unknown"
    world.ledger.settled(d)
    assert not world.events.events


@pytest.mark.parametrize(
    ("method", "client", "late_gw", "result", "event", "reason", "metric"),
    [
        (
            "POST",
            "success",
            "a1",
            reply(201),
            "payment.duplicate_suspected",
            "both_succeeded",
            "duplicate_suspected",
        ),
        (
            "POST",
            "success",
            "s1",
            reply(200),
            "payment.duplicate_suspected",
            "both_succeeded_deduped",
            "duplicate_deduped",
        ),
        (
            "POST",
            "success",
            "a1",
            TIMEOUT,
            "payment.duplicate_suspected",
            "unresolved",
            "duplicate_suspected",
        ),
        ("POST", "success", "s1", TIMEOUT, None, None, None),
        ("POST", "unknown", "a1", reply(200), "payment.late_success", None, "late_success"),
        ("POST", "failure", "a1", reply(200), "payment.late_success", None, "late_success"),
        ("POST", "unknown", "a1", reply(402), None, None, None),
        ("POST", "unknown", "a1", TIMEOUT, None, None, None),
        ("GET", "success", "a1", reply(200), None, None, None),
    ],
    ids=[
        "both-succeeded",
        "both-succeeded-deduped",
        "unresolved-other-provider",
        "unresolved-same-provider",
        "late-success-after-unknown",
        "late-success-after-failure",
        "late-refusal",
        "late-failure",
        "idempotent",
    ],
)
async def test_late_result_of_an_abandoned_attempt(
    world: World,
    method: str,
    client: str,
    late_gw: str,
    result: Result,
    event: str | None,
    reason: str | None,
    metric: str | None,
) -> None:
    d = world.dispatch(method)
    late = attempt(world, late_gw, End.ABANDONED, result)
    d.attempts.append(late)
    if client == "success":
        winner = attempt(world, "s2", End.ANSWERED, reply(200))
        d.attempts.append(winner)
        d.winner = winner
    d.client_outcome = client  # type: ignore[assignment]
    world.ledger.late_result(d, late, result)
    emitted = [e for e in world.events.events if e.kind.startswith("payment.")]
    assert [e.kind for e in emitted] == ([] if event is None else [event])
    if reason is not None:
        assert emitted[0].fields["reason"] == reason
        attempts = emitted[0].fields["attempts"]
        assert isinstance(attempts, list)
        assert attempts[0]["status"] == 200
    if metric is not None:
        assert world.late(metric) == 1.0
    await asyncio.sleep(0)  # the transaction record is written off the request path


async def test_status_of_reads_only_finished_answers(world: World) -> None:
    assert status_of(attempt(world, "s1", End.ANSWERED, reply(204))) == 204
    assert status_of(attempt(world, "s1", End.AMBIGUOUS, TIMEOUT)) is None
    assert status_of(attempt(world, "s1", End.ABANDONED, None)) is None
