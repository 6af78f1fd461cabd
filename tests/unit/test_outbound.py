"""Tests for proxy.outbound: the request value says whether its method is idempotent, and
neither value can be changed once built."""

from __future__ import annotations

import ast
from pathlib import Path

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


def test_outbound_fields_are_final() -> None:
    # Never changed once built: every field is `Final`, so the type checker refuses any
    # reassignment (a dataclass's runtime freeze would cost an interpreted `__init__`).
    # Read from the source: the native build keeps no annotations.
    source = Path(__file__).resolve().parents[2] / "proxy" / "outbound.py"
    cls = next(
        node
        for node in ast.parse(source.read_text()).body
        if isinstance(node, ast.ClassDef) and node.name == "Outbound"
    )
    fields = {
        node.target.id: ast.unparse(node.annotation)
        for node in cls.body
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
    }
    assert len(fields) == 13 and all(a.startswith("Final[") for a in fields.values()), fields
    req = outbound("POST")
    assert all(hasattr(req, name) for name in fields)
    assert req.note_attempt is None and req.forced_gateway is None and not req.has_key
