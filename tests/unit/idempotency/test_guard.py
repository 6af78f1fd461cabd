"""StoreGuard: one word per change of the store's state, and a probe that notices it back."""

from __future__ import annotations

import logging

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import ManualClock
from proxy.events import RecordingEmitter
from proxy.idempotency.guard import StoreGuard
from tests.support import eventually


class Flaky:
    def __init__(self) -> None:
        self.answers = False
        self.pings = 0

    async def ping(self) -> None:
        self.pings += 1
        if not self.answers:
            raise ConnectionError("refused")


async def test_down_is_said_once_and_up_is_noticed_by_the_probe(
    caplog: pytest.LogCaptureFixture,
) -> None:
    store = Flaky()
    registry = CollectorRegistry()
    events = RecordingEmitter(clock=ManualClock())
    guard = StoreGuard(store.ping, registry=registry, events=events, probe_every=0.01)
    with caplog.at_level(logging.ERROR):
        for _ in range(50):
            guard.failed("claim", ConnectionError("refused"))
    assert not guard.up
    assert [r.message for r in caplog.records].count(
        "idempotency store down (claim failed: ConnectionError: refused)"
    ) == 1
    assert [e.kind for e in events.events] == ["store.down"]
    assert registry.get_sample_value("payswitch_idempotency_store_up") == 0
    assert (
        registry.get_sample_value("payswitch_idempotency_store_errors_total", {"op": "claim"}) == 50
    )
    await eventually(lambda: store.pings >= 3)
    assert not guard.up
    store.answers = True
    await eventually(lambda: guard.up)
    assert [e.kind for e in events.events] == ["store.down", "store.up"]
    assert registry.get_sample_value("payswitch_idempotency_store_up") == 1
    await guard.close()


async def test_a_request_that_succeeds_brings_it_up_at_once() -> None:
    store = Flaky()
    guard = StoreGuard(store.ping, registry=CollectorRegistry(), probe_every=60)
    guard.failed("settle", OSError("broken pipe"))
    assert guard.last_error == "OSError: broken pipe"
    guard.succeeded()
    assert guard.up
    await guard.close()


async def test_a_probe_that_ended_while_down_is_started_again() -> None:
    # Requests do not try a store that is down: without its probe it would stay down.
    store = Flaky()
    guard = StoreGuard(store.ping, registry=CollectorRegistry(), probe_every=0.01)
    guard.failed("claim", ConnectionError("refused"))
    probe = guard._probe
    assert probe is not None
    probe.cancel()
    await eventually(probe.done)
    guard.skipped("claim")
    store.answers = True
    await eventually(lambda: guard.up)
    await guard.close()
    guard.failed("claim", ConnectionError("refused"))
    assert guard._probe is None or guard._probe.done(), "no probe after close"


async def test_a_store_that_fails_again_just_after_coming_back_is_probed_less_often() -> None:
    store = Flaky()
    store.answers = True
    guard = StoreGuard(store.ping, registry=CollectorRegistry(), probe_every=0.01)
    intervals = []
    for _ in range(6):  # answers the probe, fails every write at once
        guard.failed("claim", ConnectionError("OOM"))
        intervals.append(guard._interval)
        await eventually(lambda: guard.up)
    assert intervals == pytest.approx([0.01, 0.02, 0.04, 0.08, 0.16, 0.32])
    guard._interval = 4.0
    guard._up_since = 0.0  # long ago: the next outage is a new one
    guard.failed("claim", ConnectionError("refused"))
    assert guard._interval == 0.01
    await guard.close()
