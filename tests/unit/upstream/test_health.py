from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Sequence

import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpServer

from proxy.clock import ManualClock
from proxy.config.model import Gateway, HealthCheck, Limits, OutlierDetection, Route
from proxy.events import Severity
from proxy.upstream.health import Health
from proxy.upstream.state import Flag, GatewayState, Outcome, StateRegistry
from tests.unit.upstream.health_support import Recorder, gateway, route

FAST_EJECT = OutlierDetection(consecutive_failures=3, base_ejection=5.0, slow_start=10.0)


class Setup:
    def __init__(
        self,
        gateways: Sequence[Gateway],
        *,
        routes: Sequence[Route] = (),
        max_ejected_percent: float = 50.0,
    ) -> None:
        self.clock = ManualClock()
        self.rec = Recorder()
        self.metrics = CollectorRegistry()
        self.states = StateRegistry()
        self.states.reconcile({g.name: g for g in gateways})
        self.health = Health(
            self.states,
            clock=self.clock,
            events=self.rec,
            registry=self.metrics,
            routes=routes,
            max_ejected_percent=max_ejected_percent,
        )

    def __getitem__(self, name: str) -> GatewayState:
        return self.states[name]

    def admit(self, name: str) -> str | None:
        return self.health.admit(self[name], self.clock.now())

    def send(
        self,
        name: str,
        outcome: Outcome = Outcome.SUCCESS,
        latency: float = 0.01,
        retry_after: float | None = None,
    ) -> str | None:
        """One request as the request path makes it: admit, start, finish."""
        st = self[name]
        refused = self.health.admit(st, self.clock.now())
        if refused is not None:
            return refused
        self.health.started(st, self.clock.now())
        self.clock.advance(latency)
        self.health.finished(st, outcome, latency, self.clock.now(), retry_after)
        return None

    def sample(self, metric: str, **labels: str) -> float | None:
        return self.metrics.get_sample_value(metric, labels)


def _flagged(s: Setup, name: str) -> set[str]:
    return {f.name.lower() for f in Flag if f and f.name and f in s[name].flags}


# -- admission --------------------------------------------------------------------------


def _force(s: Setup, outcome: Outcome, retry_after: float | None = None) -> None:
    """Start and finish a request on g1 without asking admit() (a panic-mode send)."""
    s.health.started(s["g1"], s.clock.now())
    s.health.finished(s["g1"], outcome, 0.0, s.clock.now(), retry_after)


def _apply(s: Setup, conditions: set[str]) -> None:
    if "rate" in conditions:
        _force(s, Outcome.SUCCESS)  # spends the only token
    if "throttled" in conditions:
        _force(s, Outcome.THROTTLED, retry_after=30.0)
    if "ejected" in conditions:
        for _ in range(3):
            _force(s, Outcome.CONNECT_FAILURE)
    if "active" in conditions:
        s["g1"].set_flag(Flag.ACTIVE_FAILED, "test")
    if "draining" in conditions:
        s.health.drain(s["g1"])
    if "in-flight" in conditions:
        s["g1"].in_flight = 2


@pytest.mark.parametrize(
    ("conditions", "reason"),
    [
        (set(), None),
        ({"draining", "active", "ejected", "throttled", "in-flight", "rate"}, "draining"),
        ({"active", "ejected", "throttled", "in-flight", "rate"}, "active-failed"),
        ({"ejected", "throttled", "in-flight", "rate"}, "ejected"),
        ({"throttled", "in-flight", "rate"}, "throttled"),
        ({"in-flight", "rate"}, "in-flight-cap"),
        ({"rate"}, "rate-limited"),
    ],
    ids=["eligible", "draining", "active-failed", "ejected", "throttled", "in-flight", "rate"],
)
def test_admit_order(conditions: set[str], reason: str | None) -> None:
    limits = Limits(rate=0.001, burst=1, max_in_flight=2)
    s = Setup([gateway(limits=limits, outlier=FAST_EJECT)], max_ejected_percent=100)
    _apply(s, conditions)
    assert s.admit("g1") == reason
    if reason is not None:
        assert s.sample("payswitch_gateway_spillovers_total", gateway="g1", reason=reason) == 1


def test_looking_costs_no_token_only_sending_does() -> None:
    s = Setup([gateway(limits=Limits(rate=1.0, burst=2))])
    for _ in range(20):
        assert s.admit("g1") is None  # the balancer considering it, but picking another
    s.health.started(s["g1"], s.clock.now())
    assert s.admit("g1") is None
    s.health.started(s["g1"], s.clock.now())
    assert s.admit("g1") == "rate-limited"
    s.clock.advance(1.0)
    assert s.admit("g1") is None
    assert s["g1"].in_flight == 2


def test_in_flight_cap_frees_as_requests_finish() -> None:
    s = Setup([gateway(limits=Limits(max_in_flight=1))])
    s.health.started(s["g1"], s.clock.now())
    assert s.admit("g1") == "in-flight-cap"
    s.health.finished(s["g1"], Outcome.SUCCESS, 0.01, s.clock.now())
    assert s.admit("g1") is None
    assert s["g1"].failures == 0


def test_429_backs_off_without_counting_as_a_failure() -> None:
    s = Setup([gateway(outlier=FAST_EJECT), gateway("g2")], max_ejected_percent=100)
    for _ in range(10):
        s.health.started(s["g1"], s.clock.now())
    for _ in range(10):
        s.health.finished(s["g1"], Outcome.THROTTLED, 0.01, s.clock.now(), 3.0)
    assert s["g1"].failures == 0
    assert _flagged(s, "g1") == {"throttled"}
    assert s.admit("g1") == "throttled"
    assert s.admit("g2") is None  # the request spills over
    s.clock.advance(3.0)
    assert s.admit("g1") is None
    assert _flagged(s, "g1") == set()
    assert s.rec.events == [
        ("gateway.throttled", Severity.WARNING, {"gateway": "g1", "retry_after_s": 3.0})
    ]
    assert s["g1"].score == 1.0


def test_local_failures_say_nothing_about_the_gateway() -> None:
    s = Setup([gateway("a", outlier=FAST_EJECT), gateway("b")])
    for _ in range(10):
        s.send("a", Outcome.LOCAL)  # payswitch out of descriptors, or at the connection cap
    assert (s["a"].failures, s["a"].in_flight, s["a"].score, s.admit("a")) == (0, 0, 1.0, None)
    for _ in range(3):
        s.send("a", Outcome.RESET)
    s.clock.advance(5.0)
    assert s.admit("a") is None
    s.health.started(s["a"], s.clock.now())  # the half-open probe...
    s.clock.advance(0.05)
    s.health.finished(s["a"], Outcome.LOCAL, 0.05, s.clock.now())  # ...never reached it
    assert s.admit("a") is None  # no verdict: the next request probes at once
    assert s.rec.kinds() == ["gateway.ejected"]


# -- passive ejection -------------------------------------------------------------------


def test_failure_percentage_ejects_with_two_gateways_sharing_traffic() -> None:
    outlier = OutlierDetection(consecutive_failures=5, failure_percentage=50, min_requests=10)
    s = Setup(
        [gateway("a", outlier=outlier), gateway("b", outlier=outlier)],
        routes=[route("deposits", ("a", "b"))],
    )
    # Alternating traffic; "a" fails 3 of every 5 but never 5 in a row.
    for i in range(20):
        s.send("a", Outcome.SERVER_ERROR if i % 5 in (0, 2, 4) else Outcome.SUCCESS)
        s.send("b")
    assert s.admit("a") == "ejected"
    assert s.admit("b") is None
    (fields,) = s.rec.of("gateway.ejected")
    assert fields["gateway"] == "a" and "60% of 10" in str(fields["reason"])


@pytest.mark.parametrize(
    ("count", "cap", "ejected"),
    [
        (1, 50.0, 0),
        (2, 50.0, 1),
        (3, 50.0, 1),
        (4, 50.0, 2),
        (3, 99.0, 2),
        (3, 100.0, 3),
        (3, 0.0, 0),
    ],
    ids=["alone", "two", "three", "four", "almost-all", "all-allowed", "none-allowed"],
)
@pytest.mark.parametrize("scope", ["route", "registry"])
def test_ejection_cap_keeps_gateways_in(count: int, cap: float, ejected: int, scope: str) -> None:
    names = [f"g{i}" for i in range(count)]
    gws = [gateway(n, outlier=FAST_EJECT) for n in names]
    if scope == "route":
        s = Setup(gws, routes=[route("r", tuple(names), max_ejected_percent=cap)])
    else:
        s = Setup(gws, max_ejected_percent=cap)
    for _ in range(5):
        for n in names:
            s.send(n, Outcome.TIMEOUT)
    out = [n for n in names if s[n].flags & Flag.EJECTED]
    assert len(out) == ejected
    assert s.sample("payswitch_gateway_ejections_total", gateway="g0", source="passive") == (
        1.0 if ejected else None
    )


def test_ejection_cap_is_per_route() -> None:
    gws = [gateway(n, outlier=FAST_EJECT) for n in "abcd"]
    s = Setup(gws, routes=[route("r1", ("a", "b")), route("r2", ("c", "d"))])
    for _ in range(3):
        for n in "abc":
            s.send(n, Outcome.TIMEOUT)
    # Over the whole registry a and b would fill the 50%; per route, c may go too.
    assert [n for n in "abcd" if s[n].flags & Flag.EJECTED] == ["a", "c"]


# The README's worked example of the cap: three gateways, max_ejected_percent 50 (one).
# Each row: what g0, g1, g2 answer in each round; which end up ejected.
CAP_CASES = [
    # A region's two gateways refuse connections while g2 serves: both are proven dead.
    ({"g0": Outcome.CONNECT_FAILURE, "g1": Outcome.CONNECT_FAILURE}, ["g0", "g1"]),
    # Both gateways of one provider hang: both out, g2 carries the traffic.
    ({"g0": Outcome.TIMEOUT, "g1": Outcome.TIMEOUT}, ["g0", "g1"]),
    # Every gateway fails at once (a fault on our side): the cap holds at one.
    (
        {"g0": Outcome.CONNECT_FAILURE, "g1": Outcome.CONNECT_FAILURE, "g2": Outcome.RESET},
        ["g0"],
    ),
]


@pytest.mark.parametrize(
    ("failing", "ejected"), CAP_CASES, ids=["region-refuses", "provider-hangs", "all-fail"]
)
def test_proven_failures_eject_past_the_cap_while_a_peer_serves(
    failing: dict[str, Outcome], ejected: list[str]
) -> None:
    names = ("g0", "g1", "g2")
    s = Setup([gateway(n, outlier=FAST_EJECT) for n in names], routes=[route("r", names, 50.0)])
    for _ in range(5):
        for n in names:
            s.send(n, failing.get(n, Outcome.SUCCESS))
    assert [n for n in names if s[n].flags & Flag.EJECTED] == ejected
    if len(ejected) == 1:
        assert s.admit("g1") is None  # held by the cap: still in rotation


def test_a_failure_percentage_stays_within_the_cap() -> None:
    outlier = OutlierDetection(consecutive_failures=5, failure_percentage=50, min_requests=10)
    names = ("g0", "g1", "g2")
    s = Setup([gateway(n, outlier=outlier) for n in names], routes=[route("r", names, 50.0)])
    # g0 and g1 fail 3 of every 5, never 5 in a row: weak evidence, one may go.
    for i in range(20):
        bad = Outcome.SERVER_ERROR if i % 5 in (0, 2, 4) else Outcome.SUCCESS
        s.send("g0", bad)
        s.send("g1", bad)
        s.send("g2")
    assert [n for n in names if s[n].flags & Flag.EJECTED] == ["g0"]


@pytest.mark.parametrize(
    "peer_state",
    ["idle-since-the-failures-began", "drained", "active-failed"],
)
def test_a_peer_proves_the_fault_only_by_serving_since_it_began(peer_state: str) -> None:
    names = ("g0", "g1", "g2")
    s = Setup([gateway(n, outlier=FAST_EJECT) for n in names], routes=[route("r", names, 50.0)])
    s.send("g2")  # g2's last success, before anything failed
    s.clock.advance(1.0)
    if peer_state == "drained":
        s.send("g2")
        s.health.drain(s["g2"])
    elif peer_state == "active-failed":
        s.send("g2")
        s["g2"].set_flag(Flag.ACTIVE_FAILED, "test")
    for _ in range(3):
        s.send("g0", Outcome.CONNECT_FAILURE)
        s.send("g1", Outcome.CONNECT_FAILURE)
    assert [n for n in names if s[n].flags & Flag.EJECTED] == ["g0"]


def test_the_last_gateway_of_a_route_is_never_ejected_past_the_cap() -> None:
    names = ("a", "b")
    s = Setup([gateway(n, outlier=FAST_EJECT) for n in names], routes=[route("r", names, 50.0)])
    for _ in range(3):
        s.send("a", Outcome.TIMEOUT)
        s.send("b")
    assert s.admit("a") == "ejected"
    for _ in range(10):
        s.send("b", Outcome.TIMEOUT)
    assert s.admit("b") is None


def test_active_checks_end_a_passive_ejection_and_the_probe_decides() -> None:
    hc = HealthCheck(interval=1.0, timeout=0.5, healthy_threshold=2, unhealthy_threshold=2)
    s = Setup([gateway("a", outlier=FAST_EJECT, health_check=hc), gateway("b")])
    checker = s.health._sources["a"].active  # its results are driven by hand
    assert checker is not None
    for _ in range(3):
        s.send("a", Outcome.CONNECT_FAILURE)
    assert s.admit("a") == "ejected"
    for ok in (False, False, True):
        s.clock.advance(0.5)
        checker.record(ok, "test")
    assert s.admit("a") == "active-failed"
    s.clock.advance(0.5)
    checker.record(True, "test")  # second pass: restored, 2 s into a 5 s ejection
    assert s.admit("a") is None and s["a"].probe_due
    assert s.send("a") is None
    assert not s["a"].flags & Flag.EJECTED
    restored = [f["source"] for f in s.rec.of("gateway.restored")]
    assert restored == ["active", "passive"]


def test_passes_without_a_failed_check_do_not_shorten_an_ejection() -> None:
    hc = HealthCheck(interval=1.0, timeout=0.5, healthy_threshold=1, unhealthy_threshold=2)
    s = Setup([gateway("a", outlier=FAST_EJECT, health_check=hc), gateway("b")])
    checker = s.health._sources["a"].active
    assert checker is not None
    for _ in range(3):
        s.send("a", Outcome.TIMEOUT)
    for _ in range(4):
        s.clock.advance(1.0)
        checker.record(True, "test")  # its /health is fine; its payments were not
    assert s.admit("a") == "ejected"


def test_a_return_starts_the_predictive_averages_over() -> None:
    s = Setup([gateway("a", outlier=FAST_EJECT), gateway("b")], routes=[route("r", ("a", "b"))])
    for _ in range(40):
        s.send("a", latency=0.05)
        s.send("b", latency=0.05)
    for _ in range(3):
        s.send("a", Outcome.TIMEOUT, latency=0.3)
    assert s["a"].flags & Flag.DEGRADED
    s.clock.advance(5.0)
    assert s.send("a") is None  # the probe passes
    assert not s["a"].flags & Flag.EJECTED
    assert s["a"].score == 1.0 and not s["a"].flags & Flag.DEGRADED
    described = s.health.describe(s["a"])["degradation"]
    assert isinstance(described, dict) and described["error_rate_short"] is None


def test_a_straggler_from_before_the_ejection_does_not_count_after_the_return() -> None:
    s = Setup([gateway("a", outlier=FAST_EJECT), gateway("b")])
    t0 = s.clock.now()
    s.health.started(s["a"], t0)  # sent before the outage, still running
    for _ in range(3):
        s.send("a", Outcome.CONNECT_FAILURE)
    s.clock.advance(5.0)
    assert s.send("a") is None  # probe passes
    s.health.finished(s["a"], Outcome.TIMEOUT, s.clock.now() - t0, s.clock.now())
    described = s.health.describe(s["a"])["outlier"]
    assert isinstance(described, dict)
    assert described["consecutive_failures"] == 0 and described["window_requests"] == 0
    assert s["a"].score == 1.0


def test_half_open_probe_through_the_facade() -> None:
    s = Setup([gateway("a", outlier=FAST_EJECT), gateway("b")])
    for _ in range(3):
        s.send("a", Outcome.RESET)
    s.clock.advance(5.0)
    now = s.clock.now()
    assert s.admit("a") is None
    s.health.started(s["a"], now)
    assert s.admit("a") == "half-open"  # a second, concurrent request is refused
    s.clock.advance(0.05)
    s.health.finished(s["a"], Outcome.SUCCESS, 0.05, s.clock.now())
    assert s.admit("a") is None
    assert s["a"].weight_factor == pytest.approx(0.1)
    assert s["a"].effective_weight() == pytest.approx(0.1)
    s.clock.advance(5.0)
    s.admit("a")
    assert s["a"].weight_factor == pytest.approx(0.55)
    assert s.rec.kinds() == ["gateway.ejected", "gateway.restored"]
    assert s.sample("payswitch_gateway_up", gateway="a") == 1.0


# -- degradation ------------------------------------------------------------------------


def test_latency_climb_sheds_weight_before_any_ejection_and_recovers() -> None:
    s = Setup([gateway("a", weight=1), gateway("b", weight=3)], routes=[route("r", ("a", "b"))])
    for _ in range(600):
        s.send("a", latency=0.1)
        s.send("b", latency=0.1)
    for step in range(1, 31):
        s.send("a", latency=0.1 + 0.03 * step)
        s.send("b", latency=0.1)
    a = s["a"]
    assert a.flags & Flag.DEGRADED and not a.blocked
    assert s.admit("a") is None  # still eligible: only its weight fell
    # Floored so "a" keeps 2% of the traffic it shares with "b" (weight 3).
    assert a.score == pytest.approx(0.02 / 0.98 * 3)
    assert s.sample("payswitch_gateway_health_score", gateway="a") == pytest.approx(a.score)
    assert s.rec.kinds() == ["gateway.degraded"]
    for _ in range(100):
        s.send("a", latency=0.1)
    assert a.score == 1.0
    assert s.rec.kinds() == ["gateway.degraded", "gateway.recovered"]


# -- operator ---------------------------------------------------------------------------


def test_drain_and_undrain() -> None:
    s = Setup([gateway("a"), gateway("b")])
    assert s.health.drain(s["a"]) is True
    assert s.health.drain(s["a"]) is False
    assert s.admit("a") == "draining"
    assert s.sample("payswitch_gateway_up", gateway="a") == 1.0  # drained is not down
    assert s.health.undrain(s["a"]) is True
    assert s.health.undrain(s["a"]) is False
    assert s.admit("a") is None
    assert s.rec.events == [
        ("gateway.drained", Severity.INFO, {"gateway": "a"}),
        ("gateway.undrained", Severity.INFO, {"gateway": "a"}),
    ]


def test_describe_shows_limits_and_detector_state() -> None:
    limits = Limits(rate=10.0, burst=5, max_in_flight=3)
    s = Setup([gateway("a", limits=limits, outlier=FAST_EJECT), gateway("b")])
    s.send("a", Outcome.TIMEOUT)
    s.send("a", Outcome.SUCCESS, retry_after=None)
    s.send("a", Outcome.TIMEOUT)
    s.send("a", Outcome.THROTTLED, retry_after=2.0)
    d = s.health.describe(s["a"])
    assert d["active"] is None
    assert isinstance(d["limits"], dict) and isinstance(d["outlier"], dict)
    assert isinstance(d["degradation"], dict)
    assert d["limits"]["max_in_flight"] == 3
    assert d["limits"]["throttled_for_s"] == pytest.approx(2.0)
    assert 0 < d["limits"]["tokens"] < 5
    assert d["outlier"]["consecutive_failures"] == 1
    assert d["outlier"]["window_requests"] == 3
    assert d["outlier"]["ejected"] is False
    assert d["degradation"]["error_rate_short"] == pytest.approx(2 / 3, abs=0.01)


# -- reloads ----------------------------------------------------------------------------


def test_reload_keeps_state_of_unchanged_gateways() -> None:
    s = Setup([gateway("a", outlier=FAST_EJECT), gateway("b", outlier=FAST_EJECT)])
    s.send("a", Outcome.TIMEOUT)
    s.send("a", Outcome.TIMEOUT)
    s.send("b", Outcome.TIMEOUT)
    s.send("b", Outcome.TIMEOUT)
    moved = dataclasses.replace(gateway("b", outlier=FAST_EJECT), url="http://10.0.0.9:80")
    created, removed = s.states.reconcile({"a": gateway("a", outlier=FAST_EJECT), "b": moved})
    s.health.reconcile(created, removed)
    s.send("a", Outcome.TIMEOUT)  # the third in a row: the count survived
    s.send("b", Outcome.TIMEOUT)  # a new gateway at a new address starts clean
    assert s["a"].flags & Flag.EJECTED
    assert not s["b"].flags & Flag.EJECTED


async def test_active_checks_start_stop_and_ramp_up_on_return(
    aiohttp_server: AiohttpServer,
) -> None:
    statuses = iter([503, 200])

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=next(statuses, 200))

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    hc = HealthCheck(interval=0.01, timeout=1.0, healthy_threshold=1, unhealthy_threshold=1)
    s = Setup([gateway("a", port=server.port or 0, health_check=hc), gateway("b")])
    returned = asyncio.Event()
    s["a"].subscribe(
        lambda _st, ch: returned.set() if ch.flag is Flag.ACTIVE_FAILED and not ch.set else None
    )
    await s.health.start()
    try:
        await asyncio.wait_for(returned.wait(), timeout=5)
        assert s["a"].weight_factor == pytest.approx(0.1)  # ramps up like a passive return
        assert s.sample("payswitch_gateway_ejections_total", gateway="a", source="active") == 1
        assert s.rec.kinds() == ["gateway.ejected", "gateway.restored"]
        assert s.rec.of("gateway.ejected")[0]["source"] == "active"
        described = s.health.describe(s["a"])["active"]
        assert isinstance(described, dict) and described["failing"] is False
        # The gateway loses its health check on reload: its checker stops.
        s["a"].set_flag(Flag.ACTIVE_FAILED, "stale")
        created, removed = s.states.reconcile(
            {"a": gateway("a", port=server.port or 0), "b": gateway("b")}
        )
        s.health.reconcile(created, removed)
        assert not s["a"].flags & Flag.ACTIVE_FAILED
        assert s.health.describe(s["a"])["active"] is None
    finally:
        await s.health.close()
    assert s.sample("payswitch_gateway_up", gateway="a") == 1.0


async def test_removed_gateway_loses_its_checker_and_metrics() -> None:
    never = asyncio.Event()

    async def idle(_seconds: float) -> None:
        await never.wait()

    hc = HealthCheck()
    clock = ManualClock()
    metrics = CollectorRegistry()
    states = StateRegistry()
    states.reconcile({"a": gateway("a", health_check=hc)})
    health = Health(states, clock=clock, registry=metrics, sleep=idle)
    await health.start()
    tasks = [t for t in asyncio.all_tasks() if t.get_name() == "health-check:a"]
    assert len(tasks) == 1
    created, removed = states.reconcile({})
    health.reconcile(created, removed)
    await asyncio.sleep(0)
    assert tasks[0].cancelled()
    assert metrics.get_sample_value("payswitch_gateway_up", {"gateway": "a"}) is None
    await health.close()


def test_a_failed_check_keeps_the_half_open_probe_off_a_gateway_still_down() -> None:
    hc = HealthCheck(interval=1.0, timeout=0.5, healthy_threshold=2, unhealthy_threshold=3)
    s = Setup([gateway("a", outlier=FAST_EJECT, health_check=hc), gateway("b")])
    checker = s.health._sources["a"].active
    assert checker is not None
    for _ in range(3):
        s.send("a", Outcome.TIMEOUT)
    s.clock.advance(4.0)
    checker.record(False, "timeout")  # one failure: not yet ACTIVE_FAILED
    s.clock.advance(1.0)
    assert s.admit("a") == "ejected", "the probe would be a payment sent to a hanging gateway"
    checker.record(True, "status 200")
    assert s.admit("a") is None


def test_a_gateway_answering_nothing_is_marked_silent_until_it_answers() -> None:
    s = Setup([gateway("a"), gateway("b")], routes=[route("r", ("a", "b"))])
    for _ in range(30):
        s.send("a", latency=0.02)
    s.clock.advance(0.001)
    hung = []
    for _ in range(3):
        hung.append(s.clock.now())
        s.health.started(s["a"], s.clock.now())
        s.clock.advance(0.03)
    seen = [(s.admit("a"), s["a"].silent)]  # the oldest is 90 ms old
    s.clock.advance(0.02)
    seen.append((s.admit("a"), s["a"].silent))  # 110 ms: over 5x its usual 20 ms
    s.health.finished(s["a"], Outcome.SUCCESS, s.clock.now() - hung[1], s.clock.now())
    seen.append((s.admit("a"), s["a"].silent))  # it answered
    assert seen == [(None, False), (None, True), (None, False)]


# -- the exploration floor, worked out once per rules ------------------------------------


def _reload(s: Setup, gateways: Sequence[Gateway], routes: Sequence[Route] | None) -> None:
    """A reload as the runtime makes it: states first, then health."""
    created, removed = s.states.reconcile({g.name: g for g in gateways})
    s.health.reconcile(created, removed, routes=routes)


@pytest.mark.parametrize(
    ("after", "routes_after"),
    [
        ((gateway("g1"), gateway("g2", weight=9), gateway("g3")), None),
        ((gateway("g1", weight=5), gateway("g2"), gateway("g3")), None),
        ((gateway("g1"), gateway("g2"), gateway("g3")), [route("r", ("g1", "g2", "g3"))]),
        ((gateway("g1"), gateway("g2"), gateway("g3"), gateway("g4", weight=7)), None),
    ],
    ids=["peer-weight", "own-weight", "routes", "new-gateway-in-no-route"],
)
def test_the_cached_exploration_floor_follows_a_reload(
    after: tuple[Gateway, ...], routes_after: list[Route] | None
) -> None:
    before = (gateway("g1"), gateway("g2"), gateway("g3"))
    s = Setup(before, routes=[route("r", ("g1", "g2"))] if routes_after else ())
    first = s.health._floor(s["g1"])
    assert first == s.health._exploration_floor(s["g1"]) > 0
    _reload(s, after, routes_after)
    again = s.health._floor(s["g1"])
    assert again == s.health._exploration_floor(s["g1"])
    assert again != first, "the reload changed what the floor depends on"


def test_flag_bits_follow_every_set_and_clear() -> None:
    # Per-request tests read `bits`, a plain-int copy of `flags`: it must never lag behind.
    st = GatewayState(gateway("a"))
    assert st.bits == 0
    for flag in (Flag.DEGRADED, Flag.DRAINING, Flag.ACTIVE_FAILED, Flag.DRAINING):
        st.set_flag(flag, "test")
        assert st.bits == int(st.flags)
    for flag in (Flag.DRAINING, Flag.THROTTLED, Flag.DEGRADED, Flag.ACTIVE_FAILED):
        st.clear_flag(flag, "test")
        assert st.bits == int(st.flags)
    assert st.bits == 0 and st.flags == Flag.NONE
