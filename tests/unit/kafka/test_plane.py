from __future__ import annotations

import orjson
import pytest
from prometheus_client import CollectorRegistry

from proxy import errors
from proxy.adminhttp import Router
from proxy.kafka.commands import Command
from proxy.kafka.config import KafkaSettings
from proxy.kafka.plane import RouteDisabled, admin_routes, build, check_route, sinks
from tests.support import serving_client

CMD = Command(
    target="route/deposits",
    kind="route",
    name="deposits",
    action="disable",
    weight=None,
    issuer="ops@example.com",
    reason="provider incident",
    expires_at=1.0,
    expires_text="2026-12-01T10:00:00Z",
)


def test_a_disabled_route_is_a_503_naming_who_and_until_when() -> None:
    check_route({"deposits": CMD}, "withdrawals")
    with pytest.raises(RouteDisabled) as info:
        check_route({"deposits": CMD}, "deposits")
    answer = errors.problem_response(info.value)
    assert answer.status == 503
    body = orjson.loads(answer.body)
    assert body["route"] == "deposits"
    assert "ops@example.com" in body["detail"] and "2026-12-01T10:00:00Z" in body["detail"]
    assert "provider incident" in body["detail"]


def test_off_without_settings_on_with_them(tmp_path: object) -> None:
    registry = CollectorRegistry()
    assert build(None, registry) is None
    assert sinks(None) == []
    plane = build(KafkaSettings(bootstrap=("127.0.0.1:1",), spill_path="/nonexistent/s"), registry)
    assert plane is not None
    assert [s.name for s in sinks(plane)] == ["kafka"]


async def test_admin_control_without_kafka() -> None:
    async with serving_client(Router(admin_routes(None))) as client:
        resp = await client.get("/admin/control")
    assert resp.status == 200
    assert await resp.json() == {"kafka": False, "commands": []}
