from __future__ import annotations

from datetime import UTC, datetime

import orjson
import pytest

from proxy.clock import ManualClock
from proxy.events import RecordingEmitter
from proxy.kafka.overlay import Overlay
from proxy.upstream.health import Health
from proxy.upstream.state import Flag, StateRegistry
from tests.unit.upstream.health_support import gateway

WALL0 = 1_700_000_000.0  # ManualClock(0).wall()


def iso(offset: float) -> str:
    return datetime.fromtimestamp(WALL0 + offset, UTC).isoformat().replace("+00:00", "Z")


def command(target: str, action: str, expires_in: float = 60.0, **kw: object) -> bytes:
    return orjson.dumps(
        {
            "target": target,
            "action": action,
            "issuer": "ops",
            "reason": "incident",
            "expires_at": iso(expires_in),
            **kw,
        }
    )


class World:
    def __init__(self) -> None:
        self.clock = ManualClock(0.0)
        self.states = StateRegistry()
        self.states.reconcile({"g1": gateway("g1", weight=3), "g2": gateway("g2", port=8081)})
        self.events = RecordingEmitter(clock=self.clock)
        self.health = Health(self.states, clock=self.clock, events=self.events)
        self.overlay = Overlay(
            self.states,
            self.health,
            self.events,
            routes=lambda: frozenset({"deposits"}),
            clock=self.clock,
        )

    def send(self, target: str, value: bytes | None) -> bool:
        return self.overlay.apply_record(target.encode(), value)


@pytest.fixture
def w() -> World:
    return World()


def test_drain_applies_through_health_and_expires_on_time(w: World) -> None:
    assert w.send("gateway/g1", command("gateway/g1", "drain", expires_in=10))
    g1 = w.states["g1"]
    assert g1.flags & Flag.DRAINING
    assert g1.overlay is not None and g1.overlay["issuer"] == "ops"
    assert w.events.kinds() == ["gateway.drained", "control.applied"]
    w.clock.advance(9.9)
    assert w.overlay.expire() == WALL0 + 10
    assert g1.flags & Flag.DRAINING
    w.clock.advance(0.1)
    assert w.overlay.expire() is None
    assert not g1.flags & Flag.DRAINING
    assert w.states["g1"].describe()["overlay"] is None
    assert w.events.kinds()[-2:] == ["gateway.undrained", "control.expired"]


def test_weight_override_reaches_the_effective_weight(w: World) -> None:
    g1 = w.states["g1"]
    assert g1.effective_weight() == 3
    w.send("gateway/g1", command("gateway/g1", "weight", weight=0.5))
    assert g1.effective_weight() == 0.5
    w.send("gateway/g1", command("gateway/g1", "undrain"))  # lifts whatever g1 had
    assert g1.effective_weight() == 3
    assert g1.overlay is None


def test_route_disable_and_tombstone(w: World) -> None:
    w.send("route/deposits", command("route/deposits", "disable"))
    assert set(w.overlay.disabled_routes) == {"deposits"}
    w.send("route/deposits", None)
    assert w.overlay.disabled_routes == {}
    assert w.events.of("control.applied")[-1].fields["action"] == "clear"


@pytest.mark.parametrize(
    ("target", "value", "error"),
    [
        ("gateway/g1", b"{", "not JSON"),
        ("gateway/g1", orjson.dumps({"target": "gateway/g1", "action": "undrain"}), "required"),
        ("gateway/g1", command("gateway/g1", "drain", expires_in=-1), "already passed"),
        ("gateway/nope", command("gateway/nope", "drain"), "no gateway named"),
        ("route/nope", command("route/nope", "disable"), "no route named"),
    ],
    ids=["not-json", "incomplete", "expired", "unknown-gateway", "unknown-route"],
)
def test_a_rejected_record_changes_nothing(w: World, target: str, value: bytes, error: str) -> None:
    w.send("gateway/g1", command("gateway/g1", "drain"))
    before = dict(w.overlay.current)
    assert not w.send(target, value)
    assert w.overlay.current == before
    assert w.states["g1"].flags & Flag.DRAINING
    rejected = w.events.of("control.rejected")
    assert len(rejected) == 1 and error in str(rejected[0].fields["error"])
    assert rejected[0].fields["key"] == target


def test_the_same_record_read_twice_applies_once(w: World) -> None:
    value = command("gateway/g1", "drain")
    w.send("gateway/g1", value)
    w.send("gateway/g1", value)
    assert w.events.kinds().count("control.applied") == 1


def test_a_reload_that_replaces_a_gateway_keeps_its_overlay(w: World) -> None:
    w.send("gateway/g1", command("gateway/g1", "drain"))
    # g1 moves to another port: a new state, which the overlay must drain again.
    w.states.reconcile({"g1": gateway("g1", port=9999), "g2": gateway("g2", port=8081)})
    assert not w.states["g1"].flags & Flag.DRAINING
    w.overlay.reapply()
    assert w.states["g1"].flags & Flag.DRAINING
    assert w.states["g1"].overlay is not None


def test_on_start_a_command_that_expired_since_is_history_not_news(w: World) -> None:
    w.overlay.load(
        {
            b"gateway/g1": command("gateway/g1", "drain", expires_in=-5),
            b"gateway/g2": command("gateway/g2", "drain"),
            b"route/deposits": b"{broken",
        }
    )
    assert set(w.overlay.current) == {"gateway/g2"}
    assert [k for k in w.events.kinds() if k.startswith("control.")] == [
        "control.applied",
        "control.rejected",
    ]
