"""What goes wrong with which gateways in each failover scenario, and when.

Owns: `Timing` (scenario length and fault schedule, scaled down for --quick) and the list
of `Scenario`s, each a script that changes the behaviour of the gateways it names in
`faulty` on the scenario clock and marks the moments the report measures from ("fault",
"recovered"), and the layout (regions, active checks) it runs in.
Must not: measure or judge anything, or touch a gateway not in its `faulty`: those stay
healthy throughout.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any

from bench.scenarios_env import BASE_LATENCY, ONE_REGION, REGIONS, Layout, Timeline
from proxy.sim import Behaviour, FakeGateway

#: The ramp's end: g1 answers this slowly just before it starts hanging.
RAMP_TO = 3.0
#: How often the ramp moves g1's delay on.
RAMP_STEP = 0.1


@dataclass(frozen=True, slots=True, kw_only=True)
class Timing:
    duration: float = 30.0
    fault_at: float = 5.0
    ramp: float = 20.0  # (c): 20 ms -> 3 s over this long, then hang (as in ANCHORS.md)
    outage: float = 5.0  # (f): down this long, then back
    flap_down: float = 2.0  # (d)
    flap_up: float = 2.0
    retry_after: int = 5  # (e)
    errors_for: float = 10.0  # (g): 503s this long, then healthy again
    restart_every: float = 3.0  # (k): g1 restarts this often from the fault on
    restart_pause: float = 0.2  # ...and listens again after this long

    @classmethod
    def quick(cls) -> Timing:
        # Fault shapes that model the gateway (flap period, Retry-After) stay real; the
        # run and the phases around them shrink.
        return cls(duration=12.0, fault_at=2.0, ramp=8.0, outage=3.0, errors_for=4.0)


Fault = Callable[[dict[str, FakeGateway], Timeline, Timing], Coroutine[Any, Any, None]]
G1Fault = Callable[[FakeGateway, Timeline, Timing], Coroutine[Any, Any, None]]


def on_g1(fault: G1Fault) -> Fault:
    """A fault of g1 alone."""

    async def run(gws: dict[str, FakeGateway], tl: Timeline, tm: Timing) -> None:
        await fault(gws["g1"], tl, tm)

    return run


async def dies(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    await g1.down()


async def hangs(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    g1.set(mode="hang", charge=True)


async def slows_then_hangs(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    """Latency grows geometrically (a constant factor per second, as a saturating
    dependency does) from the base to RAMP_TO, then g1 takes payments and hangs."""
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    start = tl.mark("fault")
    factor = RAMP_TO / BASE_LATENCY
    while (frac := (tl.now() - start) / tm.ramp) < 1.0:
        g1.set(delay=BASE_LATENCY * factor**frac)
        await asyncio.sleep(RAMP_STEP)
    tl.mark("hang")
    g1.set(mode="hang", delay=0.0, charge=True)


async def flaps(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    while True:
        tl.mark("down")
        await g1.down()
        await asyncio.sleep(tm.flap_down)
        tl.mark("up")
        await g1.up(Behaviour(delay=BASE_LATENCY))
        await asyncio.sleep(tm.flap_up)


async def throttles(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    g1.set(mode="throttle", retry_after=tm.retry_after)


async def returns_after_outage(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    await g1.down()
    await asyncio.sleep(max(0.0, tm.fault_at + tm.outage - tl.now()))
    tl.mark("recovered")
    await g1.up(Behaviour(delay=BASE_LATENCY))


async def answers_503(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    g1.set(mode="status", status=503)
    await asyncio.sleep(max(0.0, tm.fault_at + tm.errors_for - tl.now()))
    tl.mark("recovered")
    g1.set(mode="ok")


async def resets_after_body(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    g1.set(mode="reset", charge=True)


async def region_refuses(gws: dict[str, FakeGateway], tl: Timeline, tm: Timing) -> None:
    """g1 and g2, the whole home region, stop listening at once."""
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    await asyncio.gather(gws["g1"].down(), gws["g2"].down())


async def provider_hangs(gws: dict[str, FakeGateway], tl: Timeline, tm: Timing) -> None:
    """Both gateways of one provider take every payment and never answer."""
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    for name in ("g1", "g2"):
        gws[name].set(mode="hang", charge=True)


async def restarts(g1: FakeGateway, tl: Timeline, tm: Timing) -> None:
    """g1 restarts every `restart_every` s, closing its pooled connections each time."""
    await asyncio.sleep(max(0.0, tm.fault_at - tl.now()))
    tl.mark("fault")
    while True:
        tl.mark("restart")
        await g1.restart(tm.restart_pause)
        await asyncio.sleep(tm.restart_every)


@dataclass(frozen=True, slots=True, kw_only=True)
class Scenario:
    key: str
    title: str  # formatted with the Timing's fields
    fault: Fault
    degradation: bool = True
    faulty: tuple[str, ...] = ("g1",)
    layout: Layout = ONE_REGION


SCENARIOS: tuple[Scenario, ...] = (
    Scenario(key="a", title="g1 refuses connections", fault=on_g1(dies)),
    Scenario(key="b", title="g1 takes the payment and hangs", fault=on_g1(hangs)),
    Scenario(
        key="c",
        title="g1 slows 20 ms -> 3 s over {ramp:g} s, then hangs",
        fault=on_g1(slows_then_hangs),
    ),
    Scenario(
        key="c-off",
        title="g1 slows 20 ms -> 3 s over {ramp:g} s, then hangs (prediction off)",
        fault=on_g1(slows_then_hangs),
        degradation=False,
    ),
    Scenario(key="d", title="g1 flaps {flap_down:g} s down / {flap_up:g} s up", fault=on_g1(flaps)),
    Scenario(key="e", title="g1 answers 429 + Retry-After: {retry_after}", fault=on_g1(throttles)),
    Scenario(
        key="f", title="g1 down for {outage:g} s, then back", fault=on_g1(returns_after_outage)
    ),
    # The two rows of ANCHORS.md beyond the six above.
    Scenario(
        key="g",
        title="g1 answers 503 for {errors_for:g} s, then recovers",
        fault=on_g1(answers_503),
    ),
    Scenario(
        key="h",
        title="g1 resets the connection after reading the body",
        fault=on_g1(resets_after_body),
    ),
    # Two of three gateways failing, and a gateway restarting.
    Scenario(
        key="i",
        title="g1, g2 (region eu) refuse connections; g3 in the fallback region; no active checks",
        fault=region_refuses,
        faulty=("g1", "g2"),
        layout=REGIONS,
    ),
    Scenario(
        key="j",
        title="g1, g2 (one provider) take payments and hang; g3 another provider",
        fault=provider_hangs,
        faulty=("g1", "g2"),
    ),
    Scenario(
        key="k",
        title="g1 restarts every {restart_every:g} s, closing its pooled connections",
        fault=on_g1(restarts),
    ),
)
