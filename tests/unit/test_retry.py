"""Tests for proxy.retry: the mechanism that applies the policy's verdicts, over real
sockets and simulated gateways: one per-try timer, abandoned attempts, `unknown_after`,
the store refusing to record an attempt, and the client leaving."""

from __future__ import annotations

import asyncio
import time
import uuid
from pathlib import Path

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import errors
from proxy.aio import spawn
from proxy.attempt import End
from proxy.outbound import Outbound
from proxy.retry import Dispatch
from proxy.sim import FakeGateway
from proxy.upstream.state import Outcome
from tests.support import Proxy, gateways, running_proxy


def rules(
    urls: dict[str, str],
    providers: dict[str, str],
    *,
    method: str = "POST",
    timeouts: str = "{per_try: 200ms, total: 4s, unknown_after: 300ms}",
    policy: str = "never",
    attempts: int = 2,
) -> str:
    gws = "\n".join(
        f"  {n}: {{url: '{u}', region: eu, provider: {providers[n]}}}" for n, u in urls.items()
    )
    return f"""
gateways:
{gws}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [{method}]}}
    region: {{default: eu}}
    gateways: [{", ".join(urls)}]
    timeouts: {timeouts}
    retry: {{attempts: {attempts}, on: [connect-failure, timeout, 503], after_ambiguous: {policy}}}
    idempotency: {{header: Idempotency-Key}}
"""


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}


async def test_no_gateway_left_answers_unknown_after_unknown_after_not_total(
    tmp_path: Path,
) -> None:
    async with gateways("s1", "a1", providers={"s1": "stripe", "a1": "adyen"}) as g:
        g["s1"].set(mode="hang")
        text = rules({n: gw.url for n, gw in g.items()}, {"s1": "stripe", "a1": "adyen"})
        async with running_proxy(text, tmp_path) as p:
            started = time.monotonic()
            status, _, body = await p.post(headers=key())
            took = time.monotonic() - started
            problem = orjson.loads(body)
            assert status == 504 and problem["title"] == "Payment outcome unknown"
            assert {t["outcome"] for t in problem["tried"]} == {"timeout", "unknown_after"}
            assert 0.45 <= took < 2.0, f"answered after {took:.2f}s; total is 4s"
            assert not g["a1"].requests(), "never resends a payment that may have been taken"


async def test_abandoned_attempt_answering_before_unknown_after_is_the_answer(
    tmp_path: Path,
) -> None:
    async with gateways("s1", providers={"s1": "stripe"}) as g:
        g["s1"].set(delay=0.35)
        text = rules({"s1": g["s1"].url}, {"s1": "stripe"})
        async with running_proxy(text, tmp_path) as p:
            status, headers, _ = await p.post(headers=key())
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "s1"
            assert p.events.kinds("transaction.succeeded") == ["transaction.succeeded"]


async def test_idempotent_request_is_cancelled_on_its_timer_and_retried(tmp_path: Path) -> None:
    async with gateways("g1", "g2", providers={"g1": "x", "g2": "x"}) as g:
        g["g1"].set(mode="hang")
        text = rules(
            {n: gw.url for n, gw in g.items()},
            {"g1": "x", "g2": "x"},
            method="PUT",
            timeouts="{per_try: 200ms, total: 2s}",
        )
        async with running_proxy(text, tmp_path) as p:
            status, headers, _ = await p.request("PUT", "/v1/deposits")
            assert (status, headers["X-Payswitch-Gateway"]) == (200, "g2")


async def test_idempotent_request_past_its_total_is_a_deadline(tmp_path: Path) -> None:
    async with gateways("g1", providers={"g1": "x"}) as g:
        g["g1"].set(mode="hang")
        text = rules(
            {"g1": g["g1"].url},
            {"g1": "x"},
            method="PUT",
            timeouts="{per_try: 300ms, total: 300ms}",
        )
        async with running_proxy(text, tmp_path) as p:
            status, _, body = await p.request("PUT", "/v1/deposits")
            assert status == 504
            assert orjson.loads(body)["title"] == "Gateway timeout"


def outbound(p: Proxy, **kw: object) -> Outbound:
    router = p.rt.store.current.compiled
    headers = CIMultiDictProxy(CIMultiDict(key()))
    plan = router.match_without_body("POST", "/v1/deposits", headers)
    assert plan is not None
    values: dict[str, object] = {
        "plan": plan,
        "region": "eu",
        "method": "POST",
        "path_qs": "/v1/deposits",
        "headers": CIMultiDict(headers),
        "body": b"{}",
        "transaction_id": "t-1",
        "attempt_header": "X-Payswitch-Attempt-Id",
        "transaction_header": "X-Payswitch-Transaction-Id",
        "has_key": True,
        "states": router.states,
    }
    values.update(kw)
    return Outbound(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize("store", ["refuses", "raises"], ids=["lease-lost", "store-down"])
async def test_an_attempt_the_store_cannot_record_is_never_sent(tmp_path: Path, store: str) -> None:
    async def note(gateway: str, attempt_id: str) -> bool:
        if store == "raises":
            raise ConnectionError("redis is down")
        return False

    async with gateways("s1", providers={"s1": "stripe"}) as g:
        async with running_proxy(rules({"s1": g["s1"].url}, {"s1": "stripe"}), tmp_path) as p:
            dispatch = Dispatch(outbound(p, note_attempt=note), p.rt.parts)
            settled = await dispatch.run()
            assert isinstance(settled.error, errors.StoreUnavailable)
            assert settled.error.status == 503
            assert not dispatch.attempts
            assert not g["s1"].requests()


async def test_attempts_are_recorded_before_they_are_sent(tmp_path: Path) -> None:
    async with gateways("s1", providers={"s1": "stripe"}) as g:
        gw: FakeGateway = g["s1"]
        noted: list[tuple[str, int]] = []

        async def note(gateway: str, attempt_id: str) -> bool:
            noted.append((gateway, len(gw.requests())))
            return True

        async with running_proxy(rules({"s1": gw.url}, {"s1": "stripe"}), tmp_path) as p:
            dispatch = Dispatch(outbound(p, note_attempt=note), p.rt.parts)
            settled = await dispatch.run()
            assert settled.reply is not None and settled.reply.status == 200
            assert noted == [("s1", 0)]
            assert dispatch.attempts[0].end is End.ANSWERED


async def test_client_leaving_keeps_sent_attempts_running_and_unknown(tmp_path: Path) -> None:
    async with gateways("s1", providers={"s1": "stripe"}) as g:
        g["s1"].set(delay=0.3)
        async with running_proxy(rules({"s1": g["s1"].url}, {"s1": "stripe"}), tmp_path) as p:
            dispatch = Dispatch(outbound(p), p.rt.parts)
            task = spawn(dispatch.run(), name="dispatch")
            await asyncio.sleep(0.1)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert dispatch.client_outcome == "unknown"
            [att] = dispatch.attempts
            assert att.end is End.ABANDONED
            assert att.task is not None
            await asyncio.wait_for(asyncio.shield(att.task), 2.0)
            assert g["s1"].requests()


async def test_a_winning_answer_reaches_health_on_the_loop_s_next_turn(tmp_path: Path) -> None:
    """The answer is written in the step that settles the dispatch; the gateway's health
    and the attempt metrics learn of it on the next turn, not before it goes out."""
    async with gateways("s1", providers={"s1": "stripe"}) as g:
        async with running_proxy(rules({"s1": g["s1"].url}, {"s1": "stripe"}), tmp_path) as p:
            dispatch = Dispatch(outbound(p), p.rt.parts)
            st = p.rt.store.current.compiled.states["s1"]
            assert st.in_flight == 0 and st.requests == 0
            settled = await dispatch.run()
            assert settled.reply is not None and settled.reply.status == 200
            [att] = dispatch.attempts
            assert att.reported, "a second report must not count it again"
            assert st.in_flight == 1, "not learnt yet in the step that answers"
            await asyncio.sleep(0)
            assert (st.in_flight, st.requests, st.failures) == (0, 1, 0)
            assert st.ewma_latency > 0
            dispatch._report(att, Outcome.SUCCESS, 0.0)
            await asyncio.sleep(0)
            assert st.in_flight == 0
