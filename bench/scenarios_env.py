"""The world one failover scenario runs in: three simulated gateways and a payswitch.

Owns: the scenario rules (written to a temp dir, pointed at the gateways' free ports), an
in-process payswitch serving them on loopback, and `Timeline`, which timestamps g1's flag
changes and every event on one monotonic clock starting at the scenario's t=0.
Must not: generate load or script faults (bench/scenarios_load.py and
bench/scenarios_faults.py do), or listen anywhere but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

from proxy.app import Runtime, proxy_server
from proxy.events import Event, Severity
from proxy.server import ProxyServer
from proxy.settings import Settings
from proxy.sim import Behaviour, FakeGateway, Ledger
from proxy.upstream.state import FlagChange, GatewayState

logger = logging.getLogger(__name__)

#: g1 and g2 are one provider: after an ambiguous failure on g1 the payment may be resent
#: to g2 with the same Idempotency-Key, which that provider dedupes. g3 is another provider
#: that could not dedupe it, so a POST is never resent there once g1 may have taken it.
PROVIDERS = {"g1": "stripe", "g2": "stripe", "g3": "adyen"}
#: Every simulated gateway answers in this long when healthy (the "20 ms" of the ramp).
BASE_LATENCY = 0.02
PER_TRY = 0.3
TOTAL = 3.0

RULES = """\
gateways:
{gateways}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu{fallback}}}
    gateways: [g1, g2, g3]
    timeouts: {{per_try: {per_try_ms}ms, total: {total_s}s, connect: 300ms, abandoned: 10s}}
    retry:
      attempts: 3
      on: [connect-failure, timeout, reset, 503]
      after_ambiguous: same-provider
"""

GATEWAY = """\
  {name}:
    url: {url}
    region: {region}
    provider: {provider}{health_check}
    outlier: {{consecutive_failures: 3, base_ejection: 2s, max_ejection: 60s}}
    degradation: {{enabled: {degradation}, short_window: 1s}}
"""
HEALTH_CHECK = """
    health_check: {path: /health, interval: 1s, timeout: 500ms, healthy_threshold: 2, unhealthy_threshold: 2}"""


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """Where the gateways are and how payswitch watches them; the default is the anchors'
    setup (one region, active checks on)."""

    regions: tuple[tuple[str, str], ...] = (("g1", "eu"), ("g2", "eu"), ("g3", "eu"))
    health_checks: bool = True

    def region(self, name: str) -> str:
        return dict(self.regions)[name]


ONE_REGION = Layout()
#: A region's two gateways (g1, g2) with the third in the fallback region, no active
#: checks: passive outlier detection alone must take the dead region out.
REGIONS = Layout(regions=(("g1", "eu"), ("g2", "eu"), ("g3", "us")), health_checks=False)


def rules_text(urls: dict[str, str], *, degradation: bool, layout: Layout = ONE_REGION) -> str:
    gws = "".join(
        GATEWAY.format(
            name=name,
            url=url,
            region=layout.region(name),
            provider=PROVIDERS[name],
            health_check=HEALTH_CHECK if layout.health_checks else "",
            degradation="true" if degradation else "false",
        )
        for name, url in urls.items()
    )
    regions = sorted(set(dict(layout.regions).values()) - {"eu"})
    fallback = f", fallback: {{eu: [{', '.join(regions)}]}}" if regions else ""
    return RULES.format(
        gateways=gws.rstrip("\n"),
        fallback=fallback,
        per_try_ms=round(PER_TRY * 1000),
        total_s=f"{TOTAL:g}",
    )


@dataclass(slots=True)
class Mark:
    """Something that happened at `t` seconds into the scenario."""

    t: float
    kind: str
    fields: dict[str, object] = field(default_factory=dict)


class Timeline:
    """The scenario clock, and what happened to g1 and the gateways on it.

    Also an event sink (the `proxy.events.Sink` protocol): the bus offers events
    synchronously, so each is stamped the moment it is emitted.
    """

    name = "scenario-timeline"
    min_severity = Severity.DEBUG

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.flags: list[Mark] = []
        self.events: list[Mark] = []
        self.marks: list[Mark] = []

    def now(self) -> float:
        return time.monotonic() - self.t0

    def at(self, monotonic: float) -> float:
        return monotonic - self.t0

    def restart(self) -> None:
        self.t0 = time.monotonic()
        self.flags.clear()
        self.events.clear()
        self.marks.clear()

    def mark(self, kind: str, **fields: object) -> float:
        t = self.now()
        self.marks.append(Mark(t, kind, dict(fields)))
        return t

    def first_mark(self, kind: str) -> float | None:
        return next((m.t for m in self.marks if m.kind == kind), None)

    # -- flag listener ------------------------------------------------------------------

    def on_flag(self, st: GatewayState, change: FlagChange) -> None:
        self.flags.append(
            Mark(
                self.now(),
                change.flag.name.lower() if change.flag.name else str(int(change.flag)),
                {"gateway": st.name, "set": change.set, "reason": change.reason},
            )
        )

    # -- event sink ---------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        return 0

    def offer(self, event: Event) -> bool:
        if not event.kind.startswith("transaction."):
            self.events.append(Mark(self.now(), event.kind, dict(event.fields)))
        return True

    async def start(self) -> None:
        return None

    async def close(self, grace: float) -> None:
        return None


@dataclass(slots=True)
class World:
    gateways: dict[str, FakeGateway]
    ledger: Ledger
    rt: Runtime
    url: str
    timeline: Timeline


@contextlib.asynccontextmanager
async def world(*, degradation: bool, layout: Layout = ONE_REGION) -> AsyncIterator[World]:
    """Three healthy gateways and a payswitch in front of them; all torn down on exit."""
    ledger = Ledger()
    gws = {
        name: FakeGateway(
            name, provider=provider, ledger=ledger, behaviour=Behaviour(delay=BASE_LATENCY)
        )
        for name, provider in PROVIDERS.items()
    }
    timeline = Timeline()
    traffic: ProxyServer | None = None
    rt: Runtime | None = None
    with tempfile.TemporaryDirectory(prefix="payswitch-scenario-") as tmp:
        try:
            for gw in gws.values():
                await gw.start()
            rules_dir = Path(tmp) / "rules"
            rules_dir.mkdir()
            text = rules_text(
                {n: g.url for n, g in gws.items()}, degradation=degradation, layout=layout
            )
            (rules_dir / "rules.yaml").write_text(textwrap.dedent(text))
            settings = Settings(
                rules=(str(rules_dir),),
                listen=("127.0.0.1", 0),
                admin=("127.0.0.1", 0),
                access_log=False,
                events="off",
                watch=False,
            )
            rt = Runtime(settings, sinks=[timeline])
            await rt.start()
            traffic = proxy_server(rt)
            await traffic.start("127.0.0.1", 0)
            for st in rt.states.values():
                st.subscribe(timeline.on_flag)
            yield World(gws, ledger, rt, f"http://127.0.0.1:{traffic.port}", timeline)
        finally:
            for gw in gws.values():
                await gw.stop()
            if traffic is not None:
                await traffic.close(1.0)
            if rt is not None:
                await rt.close()
