"""The control consumer against the real broker: it catches up with what the topic holds,
then applies what arrives, and expires commands on the wall clock."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from proxy.events import RecordingEmitter
from proxy.kafka.control import ControlConsumer
from proxy.kafka.overlay import Overlay
from proxy.upstream.health import Health
from proxy.upstream.state import Flag, StateRegistry
from tests.kafka_support import kafka_settings, publish, start_broker
from tests.support import eventually
from tests.unit.upstream.health_support import gateway

pytestmark = pytest.mark.kafka


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def test_commands_on_the_topic_before_start_apply_and_expire(tmp_path: Path) -> None:
    start_broker()
    s = kafka_settings(tmp_path)
    drain = {"action": "drain", "issuer": "ops", "reason": "r"}
    await publish(
        s, "gateway/g1", {"target": "gateway/g1", **drain, "expires_at": iso(time.time() + 60)}
    )
    # A later record for the same key wins: this one expires soon.
    expires = time.time() + 2.5
    await publish(s, "gateway/g1", {"target": "gateway/g1", **drain, "expires_at": iso(expires)})
    states = StateRegistry()
    states.reconcile({"g1": gateway("g1"), "g2": gateway("g2", port=8081)})
    events = RecordingEmitter()
    health = Health(states, events=events)
    overlay = Overlay(states, health, events, routes=lambda: frozenset())
    consumer = ControlConsumer(s, overlay)
    await consumer.start()
    try:
        await eventually(consumer.caught_up.is_set, within=15)
        assert states["g1"].flags & Flag.DRAINING
        assert events.kinds().count("control.applied") == 1  # only the current command
        await publish(s, "gateway/g2", {"target": "gateway/g2", "action": "weight", "weight": 7,
                                        "issuer": "ops", "reason": "r",
                                        "expires_at": iso(time.time() + 60)})  # fmt: skip
        await eventually(lambda: states["g2"].effective_weight() == 7, within=2)
        await eventually(lambda: not states["g1"].flags & Flag.DRAINING, within=5)
        assert time.time() - expires < 0.5
        assert events.kinds().count("control.expired") == 1
    finally:
        await consumer.close()
