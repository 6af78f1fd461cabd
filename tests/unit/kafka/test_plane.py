from __future__ import annotations

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from proxy import errors
from proxy.kafka.commands import Command
from proxy.kafka.config import KafkaSettings
from proxy.kafka.plane import RouteDisabled, admin_routes, build, check_route, sinks

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


async def test_admin_control_without_kafka(aiohttp_client: AiohttpClient) -> None:
    app = web.Application()
    app.router.add_routes(admin_routes(None))
    client = await aiohttp_client(app)
    resp = await client.get("/admin/control")
    assert await resp.json() == {"kafka": False, "commands": []}
