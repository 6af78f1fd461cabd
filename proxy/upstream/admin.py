"""Admin endpoints for gateway health: list every gateway, drain and undrain one.

Owns: the route definitions for `/admin/gateways` and its drain/undrain actions.
Must not: mount itself, check admin tokens (the admin app does both) or change any flag
other than through the health façade.
"""

from __future__ import annotations

import logging

from aiohttp import web

from proxy.upstream.health import Health
from proxy.upstream.state import GatewayState, StateRegistry

logger = logging.getLogger(__name__)


def _view(health: Health, st: GatewayState) -> dict[str, object]:
    return {**st.describe(), "health": health.describe(st)}


def _unknown(name: str) -> web.Response:
    return web.json_response(
        {"title": "Unknown gateway", "status": 404, "gateway": name},
        status=404,
        content_type="application/problem+json",
    )


def routes(health: Health, registry: StateRegistry) -> list[web.RouteDef]:
    """GET /admin/gateways, POST /admin/gateways/{name}/drain and .../undrain."""

    async def list_gateways(request: web.Request) -> web.Response:
        return web.json_response([_view(health, st) for st in registry.values()])

    async def drain(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        st = registry.get(name)
        if st is None:
            return _unknown(name)
        changed = health.drain(st)
        return web.json_response({"changed": changed, **_view(health, st)})

    async def undrain(request: web.Request) -> web.Response:
        name = request.match_info["name"]
        st = registry.get(name)
        if st is None:
            return _unknown(name)
        changed = health.undrain(st)
        return web.json_response({"changed": changed, **_view(health, st)})

    return [
        web.get("/admin/gateways", list_gateways),
        web.post("/admin/gateways/{name}/drain", drain),
        web.post("/admin/gateways/{name}/undrain", undrain),
    ]
