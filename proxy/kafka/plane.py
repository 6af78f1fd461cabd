"""Everything Kafka for one Runtime, built from `KafkaSettings` and wired in one place.

Owns: `KafkaPlane`: the sink the EventBus feeds, the control overlay and its consumer,
their start and close; `check_route`, the request path's one question to the overlay;
`GET /admin/control` (mounted by the admin app).
Must not: be imported where Kafka is off except for `check_route` and `build`; those
pull in no Kafka client.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry

from proxy import errors
from proxy.adminhttp import AdminRequest, Route, get, json_response
from proxy.events import Emitter, Sink
from proxy.http import Answer
from proxy.kafka.commands import Command
from proxy.kafka.config import KafkaSettings

if TYPE_CHECKING:
    from proxy.kafka.control import ControlConsumer
    from proxy.kafka.overlay import Overlay
    from proxy.kafka.sink import KafkaSink
    from proxy.upstream.health import Health
    from proxy.upstream.state import StateRegistry

logger = logging.getLogger(__name__)


class RouteDisabled(errors.ProxyError):
    status = 503
    title = "Route disabled by a control command"
    slug = "route-disabled"


def check_route(disabled: dict[str, Command], route: str) -> None:
    """Raise RouteDisabled when a control command disabled `route`."""
    cmd = disabled.get(route)
    if cmd is not None:
        raise RouteDisabled(
            f"route {route} is disabled until {cmd.expires_text} by {cmd.issuer}: {cmd.reason}",
            route=route,
        )


def _quiet_client_logs() -> None:
    """aiokafka logs every failed reconnect at ERROR, several a second while a broker is
    away; the sink and the consumer report an outage themselves, once, and the
    payswitch_kafka_connected gauge shows it. A level set by the operator is kept."""
    client = logging.getLogger("aiokafka")
    if client.level == logging.NOTSET:
        client.setLevel(logging.CRITICAL)


class KafkaPlane:
    def __init__(self, settings: KafkaSettings, registry: CollectorRegistry) -> None:
        from proxy.kafka.sink import KafkaSink

        _quiet_client_logs()
        self.settings = settings
        self.registry = registry
        self.sink: KafkaSink = KafkaSink(settings, registry=registry)
        self.overlay: Overlay | None = None
        self.consumer: ControlConsumer | None = None
        #: route -> command; the same dict object for the life of the process.
        self.disabled_routes: dict[str, Command] = {}

    def attach(
        self,
        states: StateRegistry,
        health: Health,
        events: Emitter,
        routes: Callable[[], frozenset[str]],
        traced: bool = True,
    ) -> None:
        """Build the overlay once the parts it acts on exist; `traced` says whether requests
        have spans whose context records should carry."""
        self.sink.trace_context = traced
        if not self.settings.control:
            return
        from proxy.kafka.control import ControlConsumer
        from proxy.kafka.overlay import Overlay

        self.overlay = Overlay(states, health, events, routes=routes, clock=health.clock)
        self.overlay.disabled_routes = self.disabled_routes
        self.consumer = ControlConsumer(self.settings, self.overlay, self.registry)

    def reapply(self) -> None:
        if self.overlay is not None:
            self.overlay.reapply()

    async def start(self) -> None:
        """The sink starts with the EventBus; this starts the control consumer."""
        if self.consumer is not None:
            await self.consumer.start()

    async def close(self) -> None:
        if self.consumer is not None:
            await self.consumer.close()


def admin_routes(plane: KafkaPlane | None) -> list[Route]:
    """GET /admin/control: every control command in force (gateways and routes), whether
    the topic has been read, and the sink's counts."""

    async def control(_: AdminRequest) -> Answer:
        if plane is None:
            return json_response({"kafka": False, "commands": []})
        sink = plane.sink
        return json_response(
            {
                "kafka": True,
                "control": plane.overlay is not None,
                "caught_up": plane.consumer is not None and plane.consumer.caught_up.is_set(),
                "commands": plane.overlay.describe() if plane.overlay is not None else [],
                "sink": {
                    "connected": sink.connected,
                    "queued": sink.queued,
                    "sent": sink.sent,
                    "dropped": sink.drops,
                    "spilled": sink.spilled,
                    "spill_bytes": sink.spill.pending_bytes,
                },
            }
        )

    return [get("/admin/control", control)]


def build(settings: KafkaSettings | None, registry: CollectorRegistry) -> KafkaPlane | None:
    return None if settings is None else KafkaPlane(settings, registry)


def sinks(plane: KafkaPlane | None) -> list[Sink]:
    return [] if plane is None else [plane.sink]
