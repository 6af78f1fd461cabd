"""The admin listener, and the probes-and-metrics listener that may stand beside it.

Owns: the admin application (probes, metrics, config, gateways, transactions, dashboard),
the probes application (`/healthz`, `/readyz`, `/metrics` only, for kubelet and
Prometheus), and the token check: with a token set, or with the admin port off loopback,
everything except the probes, `/metrics` and the dashboard's static files needs
`Authorization: Bearer <token>` — reads of rules, gateways and transactions included.
Must not: serve payment traffic, or change rules other than by asking the store to reload.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Final

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from proxy import dashboard
from proxy.config import admin as config_admin
from proxy.metrics import render
from proxy.upstream import admin as gateways_admin

if TYPE_CHECKING:
    from proxy.app import Runtime

logger = logging.getLogger(__name__)

#: What kubelet and Prometheus read: no rules, no transactions, no state change.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})

_UNAUTHORIZED: Final = {
    "title": "admin token required",
    "status": 401,
    "detail": "send Authorization: Bearer <PAYSWITCH_ADMIN_TOKEN>",
}


def _token_middleware(token: str | None, public: frozenset[str]) -> Middleware:
    """Refuse every path outside `public` unless it carries the token. With no token
    configured nothing matches, so a non-loopback admin port without one fails closed."""
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path in public:
            return await handler(request)
        given = request.headers.get("Authorization", "").encode()
        if expected is None or not hmac.compare_digest(given, expected):
            return web.json_response(
                _UNAUTHORIZED,
                status=401,
                content_type="application/problem+json",
                headers={"WWW-Authenticate": 'Bearer realm="payswitch-admin"'},
            )
        return await handler(request)

    return check


def probe_routes(rt: Runtime) -> list[web.RouteDef]:
    """GET /healthz (the loop answers), /readyz (rules loaded, not draining), /metrics."""

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if rt.shutting_down:
            return web.json_response({"status": "shutting down"}, status=503)
        if not rt.store.loaded:
            return web.json_response({"status": "rules not loaded"}, status=503)
        if down := rt.workers_down():
            return web.json_response({"status": "worker down", "workers_down": down}, status=503)
        if rt.connections.overloaded:
            cap = rt.connections
            body = {"status": "overloaded", "connections": cap.open, "max_connections": cap.limit}
            return web.json_response(body, status=503)
        # A store outage is reported, not a reason to leave the Service: every replica shares
        # the store, so failing readiness would take all of them out, unkeyed traffic too.
        return web.json_response(
            {
                "status": "ready",
                "generation": rt.store.current.generation,
                "idempotency_store": "up" if rt.payments.guard.up else "down",
            }
        )

    async def metrics(request: web.Request) -> web.Response:
        body, content_type = render(rt.registry, request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    return [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics)]


def build_probes_app(rt: Runtime) -> web.Application:
    """The probes-and-metrics listener: safe to publish to the pod network, since it shows
    no rules or transactions and changes nothing."""
    app = web.Application()
    app.router.add_routes(probe_routes(rt))
    return app


def build_admin_app(rt: Runtime) -> web.Application:
    settings = rt.settings
    dashboard_routes = dashboard.routes(
        rt.windows.view, rt.tail, lambda: rt.shutting_down or rt.stopping.is_set()
    )
    guarded = settings.admin_needs_token or settings.admin_token is not None
    # The dashboard's files are static; the JSON it polls sits under /admin/ and is guarded.
    public = PROBE_PATHS | {
        r.path
        for r in dashboard_routes
        if isinstance(r, web.RouteDef) and not r.path.startswith("/admin/")
    }
    middlewares = [_token_middleware(settings.admin_token, public)] if guarded else []
    app = web.Application(middlewares=middlewares)

    async def transaction(request: web.Request) -> web.Response:
        record = await rt.payments.lookup(request.match_info["id"])
        if record is None:
            return web.json_response(
                {"title": "unknown transaction", "id": request.match_info["id"]}, status=404
            )
        return web.json_response(record)

    app.router.add_routes(probe_routes(rt))
    app.router.add_get("/admin/transactions/{id}", transaction)
    app.router.add_routes(config_admin.routes(rt.store))
    app.router.add_routes(gateways_admin.routes(rt.health, rt.states))
    app.router.add_routes(dashboard_routes)
    return app


async def start_probes(rt: Runtime) -> web.AppRunner | None:
    """Start the probes listener when the settings name one; the caller cleans it up
    after the traffic listener has drained, so /readyz reports the drain to the end."""
    if rt.settings.probes is None:
        return None
    runner = web.AppRunner(build_probes_app(rt), access_log=None, handle_signals=False)
    await runner.setup()
    host, port = rt.settings.probes
    await web.TCPSite(runner, host, port, reuse_address=True).start()
    logger.info("probes and metrics on %s:%d", host, port)
    return runner
