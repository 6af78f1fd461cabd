"""The event tail: recent events replayed, live ones streamed as SSE, slow readers lose."""

from __future__ import annotations

import asyncio
import json

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from proxy.events import EventBus, Severity
from proxy.tail import QUEUE, TailSink, stream


async def test_offer_never_waits_and_a_slow_subscriber_loses_counted_events() -> None:
    tail = TailSink()
    bus = EventBus([tail])
    _, queue = tail.subscribe(Severity.INFO)
    for i in range(QUEUE + 5):
        bus.emit("gateway.drained", Severity.INFO, gateway=f"g{i}")
    assert queue.qsize() == QUEUE
    assert tail.dropped == 5


async def test_subscribers_get_the_recent_events_at_their_severity() -> None:
    tail = TailSink()
    bus = EventBus([tail])
    bus.emit("gateway.drained", Severity.INFO, gateway="a")
    bus.emit("gateway.ejected", Severity.WARNING, gateway="b", reason="r", duration_s=1.0)
    backlog, _ = tail.subscribe(Severity.WARNING)
    assert [e.kind for e in backlog] == ["gateway.ejected"]


async def test_a_burst_of_routine_events_does_not_push_out_a_warning() -> None:
    tail = TailSink()
    bus = EventBus([tail])
    bus.emit("gateway.ejected", Severity.WARNING, gateway="g1", reason="r", duration_s=1.0)
    for i in range(1000):
        bus.emit("gateway.drained", Severity.INFO, gateway=f"g{i}")
    warnings, _ = tail.subscribe(Severity.WARNING)
    assert [e.kind for e in warnings] == ["gateway.ejected"]
    everything, _ = tail.subscribe(Severity.INFO)
    assert everything[0].kind == "gateway.ejected" and len(everything) == 201


async def test_sse_stream_filters_by_severity_and_ends_on_close() -> None:
    tail = TailSink()
    bus = EventBus([tail])
    app = web.Application()

    async def events(request: web.Request) -> web.StreamResponse:
        return await stream(request, tail, lambda: False)

    app.router.add_get("/admin/events", events)
    async with TestClient(TestServer(app)) as client:
        bad = await client.get("/admin/events?severity=loud")
        assert bad.status == 400
        resp = await client.get("/admin/events?severity=warning")
        assert resp.headers["Content-Type"] == "text/event-stream"
        bus.emit("gateway.drained", Severity.INFO, gateway="quiet")
        bus.emit("gateway.ejected", Severity.WARNING, gateway="g1", reason="r", duration_s=1.0)
        await asyncio.sleep(0.05)
        await tail.close(1.0)
        body = (await asyncio.wait_for(resp.content.read(), 5)).decode()
    data = [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]
    assert [d["kind"] for d in data] == ["gateway.ejected"]
    assert data[0]["fields"]["gateway"] == "g1"
