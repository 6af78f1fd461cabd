"""The admin listener: probes, metrics, config, gateways, transactions, dashboard.

Owns: the admin application, and the token check on mutating endpoints when the admin
port is not loopback.
Must not: serve payment traffic, or change rules other than by asking the store to reload.
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy import dashboard
from proxy.config import admin as config_admin
from proxy.kafka import plane as kafka_plane
from proxy.upstream import admin as gateways_admin

if TYPE_CHECKING:
    from proxy.app import Runtime

logger = logging.getLogger(__name__)

_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _token_middleware(token: str | None, required: bool) -> web.middleware:  # type: ignore[valid-type]
    @web.middleware
    async def check(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.method in _SAFE_METHODS or not required:
            return await handler(request)
        given = request.headers.get("Authorization", "")
        expected = f"Bearer {token}" if token else None
        if expected is None or not hmac.compare_digest(given.encode(), expected.encode()):
            return web.json_response(
                {
                    "title": "admin token required",
                    "detail": "send Authorization: Bearer <PAYSWITCH_ADMIN_TOKEN>",
                },
                status=401,
            )
        return await handler(request)

    return check


def build_admin_app(rt: Runtime) -> web.Application:
    settings = rt.settings
    required = settings.admin_needs_token or settings.admin_token is not None
    app = web.Application(middlewares=[_token_middleware(settings.admin_token, required)])

    async def healthz(_: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    async def readyz(_: web.Request) -> web.Response:
        if rt.shutting_down:
            return web.json_response({"status": "shutting down"}, status=503)
        if not rt.store.loaded:
            return web.json_response({"status": "rules not loaded"}, status=503)
        # A store outage is reported, not a reason to leave the Service: every replica shares
        # the store, so failing readiness would take all of them out, unkeyed traffic too.
        return web.json_response(
            {
                "status": "ready",
                "generation": rt.store.current.generation,
                "idempotency_store": "up" if rt.payments.guard.up else "down",
            }
        )

    async def metrics(_: web.Request) -> web.Response:
        resp = web.Response(body=generate_latest(rt.registry))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    async def transaction(request: web.Request) -> web.Response:
        record = await rt.payments.lookup(request.match_info["id"])
        if record is None:
            return web.json_response(
                {"title": "unknown transaction", "id": request.match_info["id"]}, status=404
            )
        return web.json_response(record)

    app.router.add_get("/healthz", healthz)
    app.router.add_get("/admin/transactions/{id}", transaction)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics)
    app.router.add_routes(config_admin.routes(rt.store))
    app.router.add_routes(gateways_admin.routes(rt.health, rt.states))
    app.router.add_routes(dashboard.routes())
    app.router.add_routes(kafka_plane.admin_routes(rt.kafka))
    return app
