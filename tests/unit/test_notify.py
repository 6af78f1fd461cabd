"""Tests for proxy.notify: webhook delivery, retries with back-off, and never blocking."""

from __future__ import annotations

import json
import random
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.events import EventBus, Severity
from proxy.notify import WebhookSink


@dataclass
class Receiver:
    """A real webhook receiver on loopback that answers from a script, then 200."""

    script: list[int] = field(default_factory=list)
    posts: list[tuple[dict[str, Any], str]] = field(default_factory=list)
    url: str = ""

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.json()
        self.posts.append((body, request.headers.get("X-Payswitch-Event-Id", "")))
        status = self.script.pop(0) if self.script else 200
        return web.Response(status=status)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = Receiver()
    app = web.Application()
    app.router.add_post("/hook", rec.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    rec.url = f"http://127.0.0.1:{port}/hook"
    yield rec
    await runner.cleanup()


@pytest.fixture
def dead_url() -> str:
    """A loopback port nothing listens on: connections are refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


class Sleeps:
    """Records back-off delays instead of waiting them out."""

    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class UpperBound(random.Random):
    """Jitter that always picks the ceiling, so the back-off schedule is exact."""

    def uniform(self, a: float, b: float) -> float:
        return b


def ejected(gateway: str = "stripe-eu") -> dict[str, object]:
    return {"gateway": gateway, "source": "passive", "reason": "5xx", "duration_s": 5.0}


@pytest.mark.parametrize(
    ("failures", "posts"),
    [(0, 1), (1, 2), (3, 4)],
    ids=["first-try", "one-503", "three-503s"],
)
async def test_retries_until_delivered(receiver: Receiver, failures: int, posts: int) -> None:
    receiver.script = [503] * failures
    sleeps = Sleeps()
    sink = WebhookSink(receiver.url, attempts=5, backoff_base=0.1, sleep=sleeps)
    bus = EventBus([sink])
    await bus.start()
    bus.emit("gateway.ejected", Severity.CRITICAL, **ejected())
    await bus.close(grace=5.0)
    assert len(receiver.posts) == posts
    bodies = [body for body, _ in receiver.posts]
    assert all(b == bodies[0] for b in bodies), "every retry sends the same event"
    assert bodies[0]["kind"] == "gateway.ejected"
    assert {event_id for _, event_id in receiver.posts} == {bodies[0]["id"]}
    assert len(sleeps.delays) == failures
    assert (sink.delivered, sink.dropped) == (1, 0)


@pytest.mark.parametrize(
    ("status", "posts"),
    [(503, 3), (429, 3), (500, 3), (400, 1), (404, 1)],
    ids=["503-retried", "429-retried", "500-retried", "400-final", "404-final"],
)
async def test_gives_up_and_counts(receiver: Receiver, status: int, posts: int) -> None:
    receiver.script = [status] * 10
    sink = WebhookSink(receiver.url, attempts=3, sleep=Sleeps())
    bus = EventBus([sink])
    await bus.start()
    bus.emit("gateway.ejected", Severity.CRITICAL, **ejected())
    await bus.close(grace=5.0)
    assert len(receiver.posts) == posts
    assert (sink.delivered, sink.dropped) == (0, 1)


def test_backoff_doubles_up_to_the_cap() -> None:
    sink = WebhookSink("http://127.0.0.1:1/", backoff_base=0.5, backoff_max=3.0, rng=UpperBound())
    assert [sink.backoff(n) for n in range(1, 6)] == [0.5, 1.0, 2.0, 3.0, 3.0]


def test_backoff_jitter_stays_under_the_ceiling() -> None:
    sink = WebhookSink(
        "http://127.0.0.1:1/", backoff_base=0.5, backoff_max=3.0, rng=random.Random(7)
    )
    delays = [sink.backoff(3) for _ in range(200)]
    assert all(0 <= d <= 2.0 for d in delays)
    assert len(set(delays)) > 100, "delays are jittered, not fixed"


async def test_backoff_delays_used_between_attempts(receiver: Receiver) -> None:
    receiver.script = [503, 503, 503]
    sleeps = Sleeps()
    sink = WebhookSink(receiver.url, attempts=4, backoff_base=0.25, rng=UpperBound(), sleep=sleeps)
    bus = EventBus([sink])
    await bus.start()
    bus.emit("gateway.ejected", Severity.CRITICAL, **ejected())
    await bus.close(grace=5.0)
    assert sleeps.delays == [0.25, 0.5, 1.0]


@pytest.mark.parametrize(
    ("min_severity", "kinds"),
    [
        (Severity.ERROR, ["config.rejected", "gateway.ejected"]),
        (Severity.CRITICAL, ["gateway.ejected"]),
        (Severity.INFO, ["gateway.drained", "config.rejected", "gateway.ejected"]),
    ],
    ids=["default-error", "critical", "info"],
)
async def test_posts_only_at_or_above_min_severity(
    receiver: Receiver, min_severity: Severity, kinds: list[str]
) -> None:
    bus = EventBus([WebhookSink(receiver.url, min_severity=min_severity)])
    await bus.start()
    bus.emit("gateway.drained", Severity.INFO, gateway="a")
    bus.emit("config.rejected", Severity.ERROR, issues=[], trigger="watch")
    bus.emit("gateway.ejected", Severity.CRITICAL, **ejected())
    await bus.close(grace=5.0)
    assert [body["kind"] for body, _ in receiver.posts] == kinds


def test_default_min_severity_is_error() -> None:
    assert WebhookSink("http://127.0.0.1:1/").min_severity is Severity.ERROR


async def test_dead_receiver_blocks_nothing_and_drops_are_counted(dead_url: str) -> None:
    registry = CollectorRegistry()
    # Real back-off sleeps far longer than the test: only the close deadline ends them.
    sink = WebhookSink(dead_url, capacity=4, attempts=5, backoff_base=30.0, backoff_max=60.0)
    bus = EventBus([sink], registry=registry)
    await bus.start()
    started = time.monotonic()
    for i in range(200):
        bus.emit("gateway.ejected", Severity.CRITICAL, **ejected(f"g{i}"))
    emitting = time.monotonic() - started
    await bus.close(grace=0.2)
    closing = time.monotonic() - started
    assert emitting < 0.5
    assert closing < 3.0
    assert (sink.delivered, sink.dropped) == (0, 200)
    assert registry.get_sample_value("payswitch_events_dropped_total", {"sink": "webhook"}) == 200


async def test_dead_receiver_gives_up_after_bounded_attempts(dead_url: str) -> None:
    sleeps = Sleeps()
    sink = WebhookSink(dead_url, attempts=3, sleep=sleeps)
    bus = EventBus([sink])
    await bus.start()
    bus.emit("gateway.ejected", Severity.CRITICAL, **ejected())
    bus.emit("gateway.ejected", Severity.CRITICAL, **ejected("adyen-eu"))
    await bus.close(grace=5.0)
    assert len(sleeps.delays) == 4  # two retries per event
    assert (sink.delivered, sink.dropped) == (0, 2)


async def test_extra_headers_are_sent() -> None:
    seen: list[str | None] = []

    async def handle(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Authorization"))
        json.loads(await request.read())
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/"
        sink = WebhookSink(url, headers={"Authorization": "Bearer t0ken"})
        bus = EventBus([sink])
        await bus.start()
        bus.emit("gateway.ejected", Severity.CRITICAL, **ejected())
        await bus.close(grace=5.0)
    finally:
        await runner.cleanup()
    assert seen == ["Bearer t0ken"]
    assert sink.delivered == 1


async def test_alertmanager_format_is_an_alert_list_with_routing_labels() -> None:
    from proxy.events import make_event
    from proxy.notify import alertmanager_body

    event = make_event(
        "gateway.ejected",
        Severity.CRITICAL,
        1_700_000_000.0,
        {"gateway": "stripe-eu", "source": "passive", "reason": "5 failures", "duration_s": 5.0},
    )
    alerts = json.loads(alertmanager_body(event))
    assert isinstance(alerts, list) and len(alerts) == 1
    alert = alerts[0]
    assert alert["labels"] == {
        "alertname": "payswitch_gateway_ejected",
        "severity": "critical",
        "gateway": "stripe-eu",
    }
    assert alert["startsAt"] == "2023-11-14T22:13:20.000Z"
    assert json.loads(alert["annotations"]["event"])["fields"]["reason"] == "5 failures"


def test_unknown_webhook_format_is_refused() -> None:
    with pytest.raises(ValueError, match="webhook format"):
        WebhookSink("http://127.0.0.1:1/", body_format="xml")
