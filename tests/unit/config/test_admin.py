"""Tests for proxy.config.admin: GET /admin/config and POST /admin/reload over a real store."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from proxy.adminhttp import Router
from proxy.clock import ManualClock
from proxy.config import admin
from proxy.config.model import Rules
from proxy.config.store import ConfigStore
from tests.support import Client, serving_client

EXAMPLE_RULES = Path(__file__).resolve().parents[3] / "rules"


def route_names(rules: Rules) -> tuple[str, ...]:
    return tuple(r.name for r in rules.routes)


@pytest.fixture
def store(tmp_path: Path) -> ConfigStore[tuple[str, ...]]:
    for f in EXAMPLE_RULES.glob("*.yaml"):
        shutil.copy(f, tmp_path / f.name)
    return ConfigStore([tmp_path], route_names, clock=ManualClock())


@pytest.fixture
async def client(store: ConfigStore[tuple[str, ...]]) -> AsyncIterator[Client]:
    async with serving_client(Router(admin.routes(store))) as c:
        yield c


async def test_config_before_first_load_is_unavailable(client: Client) -> None:
    resp = await client.get("/admin/config")
    assert resp.status == 503


async def test_config_shows_the_serving_snapshot(
    client: Client, store: ConfigStore[tuple[str, ...]], tmp_path: Path
) -> None:
    snap = store.load_initial()
    resp = await client.get("/admin/config")
    assert resp.status == 200
    body = await resp.json()
    files = [str(tmp_path / "gateways.yaml"), str(tmp_path / "routes.yaml")]
    assert body["generation"] == 1
    assert body["hash"] == snap.hash
    assert body["loaded_at"] == snap.loaded_at
    assert body["trigger"] == "initial"
    assert body["files"] == files
    assert sorted(body["rules"]) == files
    assert body["rules"][files[0]]["gateways"]["stripe-eu"]["weight"] == 3
    assert body["rules"][files[1]]["routes"][0]["name"] == "deposits"
    assert body["last_error"] is None


@pytest.mark.parametrize(
    ("edit", "status", "outcome", "generation"),
    [
        (None, 200, "unchanged", 1),
        (("weight: 3\n", "weight: 4\n"), 200, "success", 2),
        (("weight: 3\n", "weight: zero\n"), 422, "failure", 1),
    ],
    ids=["unchanged", "changed", "invalid"],
)
async def test_reload(
    client: Client,
    store: ConfigStore[tuple[str, ...]],
    tmp_path: Path,
    edit: tuple[str, str] | None,
    status: int,
    outcome: str,
    generation: int,
) -> None:
    store.load_initial()
    gateways = tmp_path / "gateways.yaml"
    if edit is not None:
        gateways.write_text(gateways.read_text().replace(*edit, 1))
    resp = await client.post("/admin/reload")
    assert resp.status == status
    body = await resp.json()
    assert (body["outcome"], body["generation"], body["trigger"]) == (outcome, generation, "admin")
    config = await (await client.get("/admin/config")).json()
    assert config["generation"] == generation
    if outcome == "failure":
        [issue] = body["issues"]
        assert issue["file"] == str(gateways)
        assert issue["line"] == 10
        assert issue["pointer"] == "/gateways/stripe-eu/weight"
        assert config["last_error"]["issues"] == body["issues"]
        assert config["last_error"]["superseded"] is False
    else:
        assert body["issues"] == []
        assert config["last_error"] is None
