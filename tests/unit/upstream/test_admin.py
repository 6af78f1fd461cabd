from __future__ import annotations

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from proxy.clock import ManualClock
from proxy.upstream import admin
from proxy.upstream.health import Health
from proxy.upstream.state import StateRegistry
from tests.unit.upstream.health_support import Recorder, gateway


@pytest.fixture
def setup() -> tuple[Health, StateRegistry, Recorder]:
    states = StateRegistry()
    states.reconcile({"a": gateway("a"), "b": gateway("b", weight=3)})
    rec = Recorder()
    return Health(states, clock=ManualClock(), events=rec), states, rec


async def test_lists_every_gateway_with_its_health(
    aiohttp_client: AiohttpClient, setup: tuple[Health, StateRegistry, Recorder]
) -> None:
    health, states, _ = setup
    app = web.Application()
    app.add_routes(admin.routes(health, states))
    client = await aiohttp_client(app)
    resp = await client.get("/admin/gateways")
    assert resp.status == 200
    body = await resp.json()
    assert [g["name"] for g in body] == ["a", "b"]
    assert body[1]["weight"] == 3
    assert set(body[0]["health"]) == {"limits", "outlier", "degradation", "active"}


@pytest.mark.parametrize(
    ("actions", "flags", "changed", "events"),
    [
        (["drain"], ["draining"], [True], ["gateway.drained"]),
        (["drain", "drain"], ["draining"], [True, False], ["gateway.drained"]),
        (["drain", "undrain"], [], [True, True], ["gateway.drained", "gateway.undrained"]),
        (["undrain"], [], [False], []),
    ],
    ids=["drain", "drain-twice", "drain-undrain", "undrain-noop"],
)
async def test_drain_and_undrain(
    aiohttp_client: AiohttpClient,
    setup: tuple[Health, StateRegistry, Recorder],
    actions: list[str],
    flags: list[str],
    changed: list[bool],
    events: list[str],
) -> None:
    health, states, rec = setup
    app = web.Application()
    app.add_routes(admin.routes(health, states))
    client = await aiohttp_client(app)
    seen = []
    for action in actions:
        resp = await client.post(f"/admin/gateways/a/{action}")
        assert resp.status == 200
        body = await resp.json()
        seen.append(body["changed"])
    assert seen == changed
    assert body["flags"] == flags
    assert rec.kinds() == events
    assert states["b"].flags == 0


@pytest.mark.parametrize("action", ["drain", "undrain"])
async def test_unknown_gateway_is_404(
    aiohttp_client: AiohttpClient, setup: tuple[Health, StateRegistry, Recorder], action: str
) -> None:
    health, states, rec = setup
    app = web.Application()
    app.add_routes(admin.routes(health, states))
    client = await aiohttp_client(app)
    resp = await client.post(f"/admin/gateways/nope/{action}")
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["gateway"] == "nope"
    assert rec.events == []
