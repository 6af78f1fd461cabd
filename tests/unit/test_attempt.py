"""Tests for proxy.attempt: what an attempt's end says about the payment, the bound on
attempts left running, and reading a gateway's Retry-After."""

from __future__ import annotations

import asyncio
import email.utils
import time

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.attempt import AbandonedBudget, Attempt, End, retry_after
from proxy.config.load import build_rules
from proxy.forward import Reply
from proxy.upstream.phase import Phase, Progress
from proxy.upstream.state import GatewayState

RULES = b"""
gateways:
  g1: {url: 'http://127.0.0.1:9', region: eu}
routes:
  - name: any
    match: {path_prefix: /}
    region: {default: eu}
    gateways: [g1]
"""
GATEWAY = build_rules([("rules.yaml", RULES)]).gateways["g1"]


def attempt(end: End | None) -> Attempt:
    st = GatewayState(GATEWAY)
    return Attempt(attempt_id="a1", state=st, started=0.0, progress=Progress(), end=end)


@pytest.mark.parametrize(
    ("end", "did_nothing", "unresolved", "abandoned"),
    [
        (None, False, False, False),
        (End.ANSWERED, False, False, False),
        (End.UNSENT, True, False, False),
        (End.AMBIGUOUS, False, True, False),
        (End.ABANDONED, False, True, True),
    ],
    ids=["running", "answered", "unsent", "ambiguous", "abandoned"],
)
def test_end_says_what_the_payment_may_have_become(
    end: End | None, did_nothing: bool, unresolved: bool, abandoned: bool
) -> None:
    att = attempt(end)
    assert (att.did_nothing, att.unresolved, att.abandoned) == (did_nothing, unresolved, abandoned)
    assert att.gateway.name == "g1"


def test_progress_tells_whether_the_gateway_was_reached() -> None:
    att = attempt(None)
    assert not att.progress.reached_gateway
    att.progress.advance(Phase.SENT)
    att.progress.advance(Phase.CONNECTING)  # never backwards
    assert att.progress.phase is Phase.SENT and att.progress.reached_gateway


async def test_abandoned_budget_counts_open_attempts_until_they_end() -> None:
    budget = AbandonedBudget()
    fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    budget.track(fut)  # type: ignore[arg-type]
    assert budget.open == 1
    fut.cancel()
    await asyncio.sleep(0)
    assert budget.open == 0


def reply(value: str | None) -> Reply:
    headers: CIMultiDict[str] = CIMultiDict()
    if value is not None:
        headers["Retry-After"] = value
    return Reply(429, CIMultiDictProxy(headers), b"")


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, None), ("5", 5.0), (" 12 ", 12.0), ("soon", None), ("-3", None)],
    ids=["absent", "seconds", "padded", "garbage", "negative"],
)
def test_retry_after_in_seconds(value: str | None, expected: float | None) -> None:
    assert retry_after(reply(value)) == expected


def test_retry_after_as_a_date() -> None:
    when = email.utils.formatdate(time.time() + 30, usegmt=True)
    got = retry_after(reply(when))
    assert got is not None and 25 <= got <= 31
    assert retry_after(reply(email.utils.formatdate(time.time() - 30, usegmt=True))) == 0.0
