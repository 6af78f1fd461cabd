"""The admin listener's token rule, endpoint by endpoint, and the probes listener.

A real payswitch on loopback sockets. Every admin route must appear in ENDPOINTS with
whether it is public (probes, metrics, the dashboard's static files) or guarded; a new
route that is not classified fails the test, so nothing shows rules, transactions or
changes state without the token by accident.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yarl

from proxy.admin import PROBE_PATHS, build_admin_app, build_probes_app
from proxy.adminhttp import Router
from tests.support import gateways, running_proxy, serving

RULES = """\
gateways:
  eu1: {{url: '{url}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [eu1]
"""

TOKEN = "s3cret-admin-token"

# (method, path as requested, route pattern it hits, public?)
ENDPOINTS: list[tuple[str, str, str, bool]] = [
    ("GET", "/healthz", "/healthz", True),
    ("GET", "/readyz", "/readyz", True),
    ("GET", "/metrics", "/metrics", True),
    ("GET", "/dashboard", "/dashboard", True),
    ("GET", "/dashboard/dashboard.js", "/dashboard/dashboard.js", True),
    ("GET", "/dashboard/dashboard.css", "/dashboard/dashboard.css", True),
    ("GET", "/admin/config", "/admin/config", False),
    ("POST", "/admin/reload", "/admin/reload", False),
    ("GET", "/admin/gateways", "/admin/gateways", False),
    ("POST", "/admin/gateways/eu1/drain", "/admin/gateways/{name}/drain", False),
    ("POST", "/admin/gateways/eu1/undrain", "/admin/gateways/{name}/undrain", False),
    ("GET", "/admin/transactions/nope", "/admin/transactions/{id}", False),
    ("GET", "/admin/stats", "/admin/stats", False),
    ("GET", "/admin/control", "/admin/control", False),
]
IDS = [f"{m} {p}" for m, p, _, _ in ENDPOINTS]
#: Guarded routes that stream until the client leaves: checked for the refusal only.
STREAMS = {("GET", "/admin/events")}

# Requests that must not pass as the token.
WRONG = {
    "none": {},
    "wrong token": {"Authorization": "Bearer not-it"},
    "no scheme": {"Authorization": TOKEN},
    "basic": {"Authorization": f"Basic {TOKEN}"},
    "token prefix": {"Authorization": f"Bearer {TOKEN[:-1]}"},
}


def routes_of(router: Router) -> set[tuple[str, str]]:
    found = router.routes()
    assert len(found) == len(set(found)), "a route is listed twice"
    return set(found)


async def call(
    session: aiohttp.ClientSession, base: str, method: str, path: str, headers: dict[str, str]
) -> int:
    async with session.request(method, base + path, headers=headers) as resp:
        await resp.read()
        return resp.status


async def test_every_admin_route_is_classified(tmp_path: Path) -> None:
    async with gateways("eu1") as g, running_proxy(RULES.format(url=g["eu1"].url), tmp_path) as p:
        listed = {(m, pattern) for m, _, pattern, _ in ENDPOINTS}
        assert routes_of(build_admin_app(p.rt)) == listed | STREAMS
        assert routes_of(build_probes_app(p.rt)) == {("GET", path) for path in PROBE_PATHS}


@pytest.mark.parametrize(("method", "path", "pattern", "public"), ENDPOINTS, ids=IDS)
async def test_with_a_token_only_probes_metrics_and_static_files_are_open(
    tmp_path: Path, method: str, path: str, pattern: str, public: bool
) -> None:
    async with (
        gateways("eu1") as g,
        running_proxy(RULES.format(url=g["eu1"].url), tmp_path, admin_token=TOKEN) as p,
    ):
        for name, headers in WRONG.items():
            status = await call(p.session, p.admin_url, method, path, headers)
            if public:
                assert status == 200, (name, status)
            else:
                assert status == 401, (name, status)
        # With the token every endpoint does its job (404: the unknown transaction).
        ok = await call(p.session, p.admin_url, method, path, {"Authorization": f"Bearer {TOKEN}"})
        assert ok == (404 if "transactions" in path else 200)


async def test_the_event_stream_needs_the_token(tmp_path: Path) -> None:
    async with (
        gateways("eu1") as g,
        running_proxy(RULES.format(url=g["eu1"].url), tmp_path, admin_token=TOKEN) as p,
    ):
        for method, path in STREAMS:
            for name, headers in WRONG.items():
                assert await call(p.session, p.admin_url, method, path, headers) == 401, name


ADMIN_HOSTS: dict[str, tuple[dict[str, Any], bool]] = {
    # settings overrides, whether guarded paths answer without a token
    "loopback, no token": ({}, True),
    "pod IP, no token": ({"admin": ("0.0.0.0", 0)}, False),
    "pod IP, token": ({"admin": ("0.0.0.0", 0), "admin_token": TOKEN}, False),
    "loopback, token": ({"admin_token": TOKEN}, False),
}


@pytest.mark.parametrize(("overrides", "open_without_token"), ADMIN_HOSTS.values(), ids=ADMIN_HOSTS)
async def test_guarded_endpoints_by_admin_address_and_token(
    tmp_path: Path, overrides: dict[str, Any], open_without_token: bool
) -> None:
    async with (
        gateways("eu1") as g,
        running_proxy(RULES.format(url=g["eu1"].url), tmp_path, **overrides) as p,
    ):
        for method, path, _, public in ENDPOINTS:
            status = await call(p.session, p.admin_url, method, path, {})
            expected_open = public or open_without_token
            assert (status != 401) == expected_open, (method, path, status)


async def test_unauthorized_is_a_problem_with_a_challenge(tmp_path: Path) -> None:
    async with (
        gateways("eu1") as g,
        running_proxy(RULES.format(url=g["eu1"].url), tmp_path, admin_token=TOKEN) as p,
    ):
        async with p.session.get(f"{p.admin_url}/admin/config") as resp:
            assert resp.status == 401
            assert resp.content_type == "application/problem+json"
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            body = await resp.json()
            assert "rules" not in body and body["status"] == 401


async def test_probes_app_serves_probes_and_metrics_only(tmp_path: Path) -> None:
    async with gateways("eu1") as g, running_proxy(RULES.format(url=g["eu1"].url), tmp_path) as p:
        async with serving(build_probes_app(p.rt)) as base:
            assert await call(p.session, base, "GET", "/healthz", {}) == 200
            assert await call(p.session, base, "GET", "/readyz", {}) == 200
            async with p.session.get(f"{base}/metrics") as resp:
                assert "payswitch_config_generation" in await resp.text()
            for method, path, _, _ in ENDPOINTS:
                if path not in PROBE_PATHS:
                    assert await call(p.session, base, method, path, {}) in (404, 405), path
            p.rt.shutting_down = True
            assert await call(p.session, base, "GET", "/readyz", {}) == 503


# Paths that look public but reach a guarded endpoint, or that are not what they seem.
TRICKS = {
    "dot-dot from the dashboard": "/dashboard/../admin/config",
    "encoded dot-dot": "/dashboard/%2e%2e/admin/config",
    "trailing slash": "/admin/config/",
    "double slash": "//admin/config",
    "metrics prefix": "/metrics/../admin/transactions/x",
}


@pytest.mark.parametrize("path", TRICKS.values(), ids=TRICKS)
async def test_path_tricks_never_reach_a_guarded_endpoint(tmp_path: Path, path: str) -> None:
    async with (
        gateways("eu1") as g,
        running_proxy(RULES.format(url=g["eu1"].url), tmp_path, admin_token=TOKEN) as p,
    ):
        url = yarl.URL(p.admin_url + path, encoded=True)
        async with p.session.get(url) as resp:
            body = await resp.text()
            assert resp.status in (401, 404), (resp.status, body)
            assert "gateways" not in body and "rules" not in body
