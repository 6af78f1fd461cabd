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
from collections.abc import Callable
from typing import TYPE_CHECKING, Final

from proxy import adminhttp, dashboard
from proxy.adminhttp import AdminRequest, Route, Router, get, json_response
from proxy.config import admin as config_admin
from proxy.http import Answer
from proxy.kafka import plane as kafka_plane
from proxy.metrics import render
from proxy.upstream import admin as gateways_admin

if TYPE_CHECKING:
    from proxy.app import Runtime
    from proxy.server import ProxyServer

logger = logging.getLogger(__name__)

#: What kubelet and Prometheus read: no rules, no transactions, no state change.
PROBE_PATHS: Final = frozenset({"/healthz", "/readyz", "/metrics"})

_UNAUTHORIZED: Final = json_response(
    {
        "title": "admin token required",
        "status": 401,
        "detail": "send Authorization: Bearer <PAYSWITCH_ADMIN_TOKEN>",
    },
    status=401,
    content_type="application/problem+json",
    headers={"WWW-Authenticate": 'Bearer realm="payswitch-admin"'},
)


def authorized(given: str, expected: bytes | None) -> bool:
    """Does the Authorization field `given` carry the token? Compared in constant time;
    with no token configured (`expected` None) nothing does, so a non-loopback admin port
    without one fails closed."""
    return expected is not None and hmac.compare_digest(
        given.encode("utf-8", "surrogateescape"), expected
    )


def token_guard(
    token: str | None, public: frozenset[str]
) -> Callable[[AdminRequest], Answer | None]:
    """Refuse every path outside `public` unless it carries the token: a 401 problem with
    a Bearer challenge."""
    expected = f"Bearer {token}".encode() if token else None

    def check(request: AdminRequest) -> Answer | None:
        if request.path in public:
            return None
        if authorized(request.headers.get("Authorization", ""), expected):
            return None
        return _UNAUTHORIZED

    return check


def probe_routes(rt: Runtime) -> list[Route]:
    """GET /healthz (the loop answers), /readyz (rules loaded, not draining), /metrics."""

    async def healthz(_: AdminRequest) -> Answer:
        return json_response({"status": "ok"})

    async def readyz(_: AdminRequest) -> Answer:
        if rt.shutting_down:
            return json_response({"status": "shutting down"}, status=503)
        if not rt.store.loaded:
            return json_response({"status": "rules not loaded"}, status=503)
        if down := rt.workers_down():
            return json_response({"status": "worker down", "workers_down": down}, status=503)
        if rt.connections.overloaded:
            cap = rt.connections
            body = {"status": "overloaded", "connections": cap.open, "max_connections": cap.limit}
            return json_response(body, status=503)
        # A store outage is reported, not a reason to leave the Service: every replica shares
        # the store, so failing readiness would take all of them out, unkeyed traffic too.
        return json_response(
            {
                "status": "ready",
                "generation": rt.store.current.generation,
                "idempotency_store": "up" if rt.payments.guard.up else "down",
            }
        )

    async def metrics(request: AdminRequest) -> Answer:
        body, content_type = render(rt.registry, request.headers.get("Accept"))
        return Answer(200, {"Content-Type": content_type}, body)

    return [get("/healthz", healthz), get("/readyz", readyz), get("/metrics", metrics)]


def build_probes_app(rt: Runtime) -> Router:
    """The probes-and-metrics listener: safe to publish to the pod network, since it shows
    no rules or transactions and changes nothing."""
    return Router(probe_routes(rt))


def build_admin_app(rt: Runtime) -> Router:
    settings = rt.settings
    dashboard_routes = dashboard.routes(
        rt.windows.view, rt.tail, lambda: rt.shutting_down or rt.stopping.is_set()
    )
    guarded = settings.admin_needs_token or settings.admin_token is not None
    # The dashboard's files are static; the JSON it polls sits under /admin/ and is guarded.
    public = PROBE_PATHS | {
        r.pattern for r in dashboard_routes if not r.pattern.startswith("/admin/")
    }

    async def transaction(request: AdminRequest) -> Answer:
        record = await rt.payments.lookup(request.params["id"])
        if record is None:
            return json_response(
                {"title": "unknown transaction", "id": request.params["id"]}, status=404
            )
        return json_response(record)

    return Router(
        [
            *probe_routes(rt),
            get("/admin/transactions/{id}", transaction),
            *config_admin.routes(rt.store),
            *gateways_admin.routes(rt.health, rt.states),
            *dashboard_routes,
            *kafka_plane.admin_routes(rt.kafka),
        ],
        guard=token_guard(settings.admin_token, public) if guarded else None,
    )


async def start_admin(rt: Runtime) -> ProxyServer:
    """Start the admin listener on the settings' address."""
    host, port = rt.settings.admin
    return await adminhttp.serve(build_admin_app(rt), host, port)


async def start_probes(rt: Runtime) -> ProxyServer | None:
    """Start the probes listener when the settings name one; the caller closes it
    after the traffic listener has drained, so /readyz reports the drain to the end."""
    if rt.settings.probes is None:
        return None
    host, port = rt.settings.probes
    server = await adminhttp.serve(build_probes_app(rt), host, port)
    logger.info("probes and metrics on %s:%d", host, port)
    return server
