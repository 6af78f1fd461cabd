"""Tests for proxy.outbound: the request value says whether its method is idempotent, and
neither value can be changed once built."""

from __future__ import annotations

import dataclasses

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.load import build_rules
from proxy.outbound import Outbound
from proxy.routing import compile_router

RULES = b"""
gateways:
  g1: {url: 'http://127.0.0.1:9', region: eu}
routes:
  - name: any
    match: {path_prefix: /}
    region: {default: eu}
    gateways: [g1]
"""


def outbound(method: str) -> Outbound:
    router = compile_router(build_rules([("rules.yaml", RULES)]))
    plan = router.match_without_body(method, "/x", CIMultiDictProxy(CIMultiDict()))
    assert plan is not None
    return Outbound(
        plan=plan,
        region="eu",
        method=method,
        path_qs="/x",
        headers=CIMultiDict(),
        body=b"",
        transaction_id="t",
        attempt_header="X-Payswitch-Attempt-Id",
        transaction_header="X-Payswitch-Transaction-Id",
    )


@pytest.mark.parametrize(
    ("method", "idempotent"),
    [("GET", True), ("PUT", True), ("DELETE", True), ("POST", False), ("PATCH", False)],
    ids=["get", "put", "delete", "post", "patch"],
)
def test_idempotent_follows_the_method(method: str, idempotent: bool) -> None:
    assert outbound(method).idempotent is idempotent


def test_outbound_is_frozen() -> None:
    req = outbound("POST")
    with pytest.raises(dataclasses.FrozenInstanceError):
        req.method = "GET"  # type: ignore[misc]
    assert req.note_attempt is None and req.forced_gateway is None and not req.has_key
