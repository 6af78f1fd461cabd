"""Logical routing: first match wins over path, method, headers and body fields."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.load import build_rules
from proxy.routing import compile_router

RULES = b"""
gateways:
  g: {url: "http://127.0.0.1:1", region: eu}
  h: {url: "http://127.0.0.1:2", region: us}
routes:
  - name: exact
    match: {path: /v1/health-of-payments}
    region: {default: eu}
    gateways: [g]
  - name: eur-deposits
    match: {path_prefix: /v1/deposits, methods: [POST], body: {currency: [EUR], "meta.channel": web}}
    region: {default: eu}
    gateways: [g]
  - name: vip
    match: {path_prefix: /v1/deposits, headers: {X-Tier: [gold, platinum]}}
    region: {default: eu}
    gateways: [g]
  - name: deposits
    match: {path_prefix: /v1/deposits, methods: [POST]}
    region: {header: X-Region, default: eu, country_header: X-Country, countries: {US: us}, fallback: {eu: [us]}}
    gateways: [g, h]
"""


def hdrs(**kw: str) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict({k.replace("_", "-"): v for k, v in kw.items()}))


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "expected"),
    [
        ("GET", "/v1/health-of-payments", {}, b"", "exact"),
        ("GET", "/v1/health-of-payments/x", {}, b"", None),
        (
            "POST",
            "/v1/deposits",
            {},
            b'{"currency": "EUR", "meta": {"channel": "web"}}',
            "eur-deposits",
        ),
        (
            "POST",
            "/v1/deposits",
            {},
            b'{"currency": "USD", "meta": {"channel": "web"}}',
            "deposits",
        ),
        ("POST", "/v1/deposits", {}, b"not json", "deposits"),
        ("POST", "/v1/deposits", {"X_Tier": "gold"}, b"{}", "vip"),
        ("GET", "/v1/deposits/abc", {"X_Tier": "gold"}, b"", "vip"),
        ("GET", "/v1/deposits/abc", {"X_Tier": "bronze"}, b"", None),
        ("POST", "/v1/depositsXYZ", {}, b"", None),
        ("POST", "/v1/deposits/123/capture", {}, b"", "deposits"),
        ("DELETE", "/v1/deposits", {}, b"", None),
    ],
    ids=[
        "exact-path",
        "exact-is-not-prefix",
        "body-fields",
        "body-value-differs",
        "body-not-json",
        "header-values",
        "header-any-method",
        "header-value-not-listed",
        "prefix-respects-segment",
        "prefix-subpath",
        "method-not-listed",
    ],
)
def test_first_match_wins(
    method: str, path: str, headers: dict[str, str], body: bytes, expected: str | None
) -> None:
    router = compile_router(build_rules([("r.yaml", RULES)]))
    plan = router.match(method, path, hdrs(**headers), body)
    assert (plan.name if plan else None) == expected


@pytest.mark.parametrize(
    ("headers", "region"),
    [
        ({}, "eu"),
        ({"X_Region": "us"}, "us"),
        ({"X_Country": "US"}, "us"),
        ({"X_Region": "eu", "X_Country": "US"}, "eu"),
    ],
    ids=["default", "header", "country-map", "header-wins-over-country"],
)
def test_region_resolution(headers: dict[str, str], region: str) -> None:
    router = compile_router(build_rules([("r.yaml", RULES)]))
    plan = router.match("POST", "/v1/deposits", hdrs(**headers), b"{}")
    assert plan is not None and plan.name == "deposits"
    assert plan.region_for(hdrs(**headers)) == region
    assert plan.region_order["eu"] == ("eu", "us")
