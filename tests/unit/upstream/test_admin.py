from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from proxy.adminhttp import Router
from proxy.clock import ManualClock
from proxy.upstream import admin
from proxy.upstream.health import Health
from proxy.upstream.state import StateRegistry
from tests.support import Client, serving_client
from tests.unit.upstream.health_support import Recorder, gateway


@pytest.fixture
def setup() -> tuple[Health, StateRegistry, Recorder]:
    states = StateRegistry()
    states.reconcile({"a": gateway("a"), "b": gateway("b", weight=3)})
    rec = Recorder()
    return Health(states, clock=ManualClock(), events=rec), states, rec


@pytest.fixture
async def client(setup: tuple[Health, StateRegistry, Recorder]) -> AsyncIterator[Client]:
    health, states, _ = setup
    async with serving_client(Router(admin.routes(health, states))) as c:
        yield c


async def test_lists_every_gateway_with_its_health(
    client: Client, setup: tuple[Health, StateRegistry, Recorder]
) -> None:
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
    client: Client,
    setup: tuple[Health, StateRegistry, Recorder],
    actions: list[str],
    flags: list[str],
    changed: list[bool],
    events: list[str],
) -> None:
    _, states, rec = setup
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
    client: Client, setup: tuple[Health, StateRegistry, Recorder], action: str
) -> None:
    _, _, rec = setup
    resp = await client.post(f"/admin/gateways/nope/{action}")
    assert resp.status == 404
    assert resp.content_type == "application/problem+json"
    assert (await resp.json())["gateway"] == "nope"
    assert rec.events == []
