"""Admin endpoints for gateway health: list every gateway, drain and undrain one.

Owns: the route definitions for `/admin/gateways` and its drain/undrain actions.
Must not: mount itself, check admin tokens (the admin app does both) or change any flag
other than through the health façade.
"""

from __future__ import annotations

import logging

from proxy.adminhttp import AdminRequest, Route, get, json_response, post
from proxy.http import Answer
from proxy.upstream.health import Health
from proxy.upstream.state import GatewayState, StateRegistry

logger = logging.getLogger(__name__)


def _view(health: Health, st: GatewayState) -> dict[str, object]:
    return {**st.describe(), "health": health.describe(st)}


def _unknown(name: str) -> Answer:
    return json_response(
        {"title": "Unknown gateway", "status": 404, "gateway": name},
        status=404,
        content_type="application/problem+json",
    )


def routes(health: Health, registry: StateRegistry) -> list[Route]:
    """GET /admin/gateways, POST /admin/gateways/{name}/drain and .../undrain."""

    async def list_gateways(request: AdminRequest) -> Answer:
        return json_response([_view(health, st) for st in registry.values()])

    async def drain(request: AdminRequest) -> Answer:
        name = request.params["name"]
        st = registry.get(name)
        if st is None:
            return _unknown(name)
        changed = health.drain(st)
        return json_response({"changed": changed, **_view(health, st)})

    async def undrain(request: AdminRequest) -> Answer:
        name = request.params["name"]
        st = registry.get(name)
        if st is None:
            return _unknown(name)
        changed = health.undrain(st)
        return json_response({"changed": changed, **_view(health, st)})

    return [
        get("/admin/gateways", list_gateways),
        post("/admin/gateways/{name}/drain", drain),
        post("/admin/gateways/{name}/undrain", undrain),
    ]
