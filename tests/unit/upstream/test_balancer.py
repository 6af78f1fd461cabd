"""The balancer: region order, smooth weighted round robin, exclusion; pure and sync."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from proxy.config.load import build_rules
from proxy.routing import RoutePlan, compile_router
from proxy.upstream.balancer import Balancer, Skip
from proxy.upstream.state import Flag, GatewayState, StateRegistry

RULES = b"""
gateways:
  a: {url: "http://127.0.0.1:1", region: eu, weight: 5, provider: p1}
  b: {url: "http://127.0.0.1:2", region: eu, weight: 3, provider: p2}
  c: {url: "http://127.0.0.1:3", region: eu, weight: 2, provider: p1}
  d: {url: "http://127.0.0.1:4", region: us, weight: 1, provider: p2}
  e: {url: "http://127.0.0.1:5", region: apac, weight: 1, provider: p1}
routes:
  - name: r
    match: {path_prefix: /}
    region: {default: eu, fallback: {eu: [us, apac], us: [apac]}}
    gateways: [a, b, c, d, e]
"""


def setup() -> tuple[Balancer, StateRegistry, RoutePlan]:
    rules = build_rules([("r.yaml", RULES)])
    states = StateRegistry()
    states.reconcile(rules.gateways)
    plan = compile_router(rules).plans[0]
    return Balancer(states, rng=random.Random(7)), states, plan


def admit_all(st: GatewayState) -> str | None:
    return None


def name_of(st: GatewayState | None) -> str:
    assert st is not None
    return st.name


def test_weights_are_honoured_within_two_percent_over_10000_picks() -> None:
    bal, _, plan = setup()
    counts = Counter(name_of(bal.pick(plan, "eu", admit_all)) for _ in range(10_000))
    for name, weight in (("a", 5), ("b", 3), ("c", 2)):
        share = counts[name] / 10_000
        assert abs(share - weight / 10) <= 0.02 * weight / 10, counts


def test_smooth_wrr_interleaves_like_nginx() -> None:
    bal, _, plan = setup()
    seq = "".join(name_of(bal.pick(plan, "eu", admit_all)) for _ in range(10))
    # nginx's smooth WRR never sends a burst of a heavy peer's whole weight in a row.
    assert "aaaaa" not in seq
    assert Counter(seq) == {"a": 5, "b": 3, "c": 2}


@pytest.mark.parametrize(
    ("region", "blocked", "exclude", "expected"),
    [
        ("eu", set(), {"a", "b", "c"}, "d"),
        ("us", set(), set(), "d"),
        ("us", {"d"}, set(), "e"),
        ("apac", set(), set(), "e"),
        ("eu", {"a", "b", "c", "d"}, set(), "e"),
        ("eu", {"a", "b", "c", "d", "e"}, set(), None),
        ("mars", set(), {"a", "b"}, "c"),
    ],
    ids=[
        "home-exhausted",
        "us-home",
        "us-fallback",
        "apac",
        "second-fallback",
        "nothing",
        "unknown-region-default",
    ],
)
def test_region_order_and_exclusion(
    region: str, blocked: set[str], exclude: set[str], expected: str | None
) -> None:
    bal, states, plan = setup()
    for name in blocked:
        states[name].set_flag(Flag.EJECTED, "test")
    skipped: list[Skip] = []

    def admit(st: GatewayState) -> str | None:
        return "ejected" if st.blocked else None

    got = bal.pick(plan, region, admit, exclude, skipped=skipped)
    assert (got.name if got else None) == expected
    if expected is None:
        assert {sk.gateway for sk in skipped} == blocked - exclude


def test_allow_filter_limits_to_one_provider() -> None:
    bal, _, plan = setup()
    picks = {
        name_of(bal.pick(plan, "eu", admit_all, allow=lambda g: g.provider == "p2"))
        for _ in range(20)
    }
    assert picks == {"b"}


def test_state_survives_reconcile_for_unchanged_identity() -> None:
    rules = build_rules([("r.yaml", RULES)])
    states = StateRegistry()
    states.reconcile(rules.gateways)
    states["a"].set_flag(Flag.EJECTED, "test")
    states["a"].requests = 42
    changed = build_rules(
        [("r.yaml", RULES.replace(b"weight: 5", b"weight: 9").replace(b":2", b":22"))]
    )
    created, removed = states.reconcile(changed.gateways)
    assert states["a"].requests == 42 and states["a"].flags & Flag.EJECTED
    assert states["a"].gateway.weight == 9
    assert [s.name for s in created] == ["b"] and [s.name for s in removed] == ["b"]


@pytest.mark.parametrize(
    ("due", "exclude", "allow_p2", "expected"),
    [
        ("c", set(), False, "c"),
        ("c", {"c"}, False, None),
        ("c", set(), True, None),
        ("d", set(), False, None),
    ],
    ids=["picked-first", "already-tried", "other-provider", "other-region-waits"],
)
def test_a_due_half_open_probe_does_not_wait_for_round_robin(
    due: str, exclude: set[str], allow_p2: bool, expected: str | None
) -> None:
    bal, states, plan = setup()
    states[due].probe_due = True
    allow = (lambda g: g.provider == "p2") if allow_p2 else None
    picks = [name_of(bal.pick(plan, "eu", admit_all, exclude, allow)) for _ in range(3)]
    if expected is not None:
        assert picks == [expected] * 3  # until the probe starts, every pick sends it
    else:
        assert due not in picks


@pytest.mark.parametrize(
    ("silent", "region", "expected", "skipped"),
    [
        ({"a"}, "eu", {"b", "c"}, {"a"}),
        ({"a", "b", "c"}, "eu", {"d"}, set()),  # the fallback region answers
        ({"d"}, "us", {"d"}, set()),  # silent beats nothing
    ],
    ids=["passed-over", "fallback-region-first", "last-resort"],
)
def test_a_silent_gateway_only_when_no_other_can_take_it(
    silent: set[str], region: str, expected: set[str], skipped: set[str]
) -> None:
    bal, states, plan = setup()
    states["e"].set_flag(Flag.DRAINING, "test")
    for name in silent:
        states[name].silent = True

    def admit(st: GatewayState) -> str | None:
        return "draining" if st.blocked else None

    seen: list[Skip] = []
    picks = {name_of(bal.pick(plan, region, admit, skipped=seen)) for _ in range(12)}
    assert picks == expected
    assert {sk.gateway for sk in seen if sk.reason == "silent"} == skipped


LEAST_LATENCY = b"""
gateways:
  g1: {url: "http://127.0.0.1:1", region: eu, provider: p1,
       degradation: {short_window: 300ms}}
  g2: {url: "http://127.0.0.1:2", region: eu, provider: p2,
       degradation: {short_window: 300ms}}
routes:
  - name: r
    match: {path_prefix: /}
    balancing: least-latency
    region: {default: eu}
    gateways: [g1, g2]
"""


def least_latency_setup() -> tuple[Balancer, StateRegistry, RoutePlan]:
    rules = build_rules([("r.yaml", LEAST_LATENCY)])
    states = StateRegistry()
    states.reconcile(rules.gateways)
    return Balancer(states, rng=random.Random(7)), states, compile_router(rules).plans[0]


def answered(st: GatewayState, latency: float, at: float, score: float = 1.0) -> None:
    st.ewma_latency, st.ewma_at, st.score = latency, at, score


def test_least_latency_picks_the_faster_gateway() -> None:
    bal, states, plan = least_latency_setup()
    answered(states["g1"], 0.060, at=100.0)
    answered(states["g2"], 0.002, at=100.0)
    picks = Counter(name_of(bal.pick(plan, "eu", admit_all, now=100.01)) for _ in range(50))
    assert picks == {"g2": 50}


def test_least_latency_tries_again_a_gateway_passed_over_after_one_slow_spell() -> None:
    # g2 was caught by a stall (200 ms, score at its floor) while g1 answered in 60 ms at
    # its floor too. g2 loses every comparison and so takes no answer that could change
    # its figures; its latency fades until it is tried again.
    bal, states, plan = least_latency_setup()
    answered(states["g1"], 0.060, at=100.0, score=0.05)
    answered(states["g2"], 0.200, at=100.0, score=0.05)
    assert name_of(bal.pick(plan, "eu", admit_all, now=100.01)) == "g1"
    states["g1"].ewma_at = 101.0  # g1 goes on answering; g2 has answered nothing since 100
    assert name_of(bal.pick(plan, "eu", admit_all, now=101.0)) == "g2"
    # Without a clock nothing fades: the old behaviour, for callers that have none.
    assert name_of(bal.pick(plan, "eu", admit_all)) == "g1"


def test_least_latency_does_not_fade_a_gateway_holding_requests() -> None:
    # g2 holds three requests and has answered none for a second: it must not look fast.
    bal, states, plan = least_latency_setup()
    answered(states["g1"], 0.010, at=101.0)
    answered(states["g2"], 0.010, at=100.0)
    states["g2"].in_flight = 3
    picks = Counter(name_of(bal.pick(plan, "eu", admit_all, now=101.0)) for _ in range(20))
    assert picks == {"g1": 20}
