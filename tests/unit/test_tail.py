"""The event tail: recent events replayed, live ones streamed as SSE, slow readers lose."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import pytest

from proxy.adminhttp import AdminRequest, Router, get
from proxy.events import EventBus, Severity
from proxy.http import Answer
from proxy.tail import HEARTBEAT, QUEUE, TailSink, stream
from tests.support import eventually, serving


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


def _events_router(tail: TailSink, stopping: list[bool]) -> Router:
    async def events(request: AdminRequest) -> Answer:
        return stream(request, tail, lambda: stopping[0])

    return Router([get("/admin/events", events)])


def _data(body: str) -> list[dict[str, object]]:
    return [json.loads(line[6:]) for line in body.splitlines() if line.startswith("data: ")]


async def test_sse_stream_filters_by_severity_and_ends_on_close() -> None:
    tail = TailSink()
    bus = EventBus([tail])
    async with serving(_events_router(tail, [False])) as base, aiohttp.ClientSession() as http:
        async with http.get(f"{base}/admin/events?severity=loud") as bad:
            assert bad.status == 400
            assert "severity must be one of" in await bad.text()
        async with http.get(f"{base}/admin/events?severity=warning") as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            assert resp.headers["Cache-Control"] == "no-cache"
            assert resp.headers["Transfer-Encoding"] == "chunked"
            bus.emit("gateway.drained", Severity.INFO, gateway="quiet")
            bus.emit("gateway.ejected", Severity.WARNING, gateway="g1", reason="r", duration_s=1.0)
            await asyncio.sleep(0.05)
            await tail.close(1.0)
            body = (await asyncio.wait_for(resp.content.read(), 5)).decode()
    assert body.startswith("retry: 2000\n\n")
    data = _data(body)
    assert [d["kind"] for d in data] == ["gateway.ejected"]
    assert data[0]["fields"] == {"gateway": "g1", "reason": "r", "duration_s": 1.0}


ENDINGS = ["client leaves", "process stops"]


@pytest.mark.parametrize("ending", ENDINGS, ids=ENDINGS)
async def test_sse_stream_ends_cleanly_and_unsubscribes(ending: str) -> None:
    tail = TailSink()
    stopping = [False]
    async with serving(_events_router(tail, stopping)) as base, aiohttp.ClientSession() as http:
        resp = await http.get(f"{base}/admin/events")
        assert await resp.content.readuntil(b"\n\n") == b"retry: 2000\n\n"
        assert len(tail._subscribers) == 1
        if ending == "client leaves":
            resp.close()
        else:
            stopping[0] = True
            # The answer ends whole: the chunked body's last chunk arrives.
            assert await asyncio.wait_for(resp.content.read(), 2 * HEARTBEAT + 1) == b""
            resp.close()
        await eventually(lambda: not tail._subscribers, within=2 * HEARTBEAT + 1)
