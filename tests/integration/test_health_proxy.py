"""Gateway health end to end: real payswitch, real simulated gateways, real time.

Each test shows one health behaviour through the whole request path: active checks,
passive ejection with half-open probes, 429 back-off, local limits spilling over, every
gateway out, operator drain, predictive degradation. Durations are scaled down (tens to
hundreds of milliseconds) so the file runs in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.aio import spawn
from proxy.events import Event
from proxy.sim import FakeGateway
from proxy.upstream.state import Flag
from tests.support import Proxy, eventually, gateways, running_proxy

FAST_CHECK = (
    "{path: /health, interval: 100ms, timeout: 100ms, healthy_threshold: 2, unhealthy_threshold: 2}"
)


def rules(
    gws: Mapping[str, FakeGateway],
    *,
    gateway_extra: Mapping[str, str] | None = None,
    route_extra: str = "",
    retry: str = "{attempts: 3, on: [connect-failure, timeout, reset, 503], after_ambiguous: same-provider}",
    timeouts: str = "{per_try: 2s, total: 5s}",
) -> str:
    """Rules with one POST route over `gws`, all in region eu, one provider each.

    The timeouts are generous: a burst slowed by a busy machine past a short per-try
    timeout would make a healthy gateway look silent and eject it, which no test here is
    about; a test about slowness passes its own."""
    lines = ["gateways:"]
    for name, gw in gws.items():
        extra = (gateway_extra or {}).get(name, "")
        lines.append(f"  {name}:")
        lines.append(f"    url: '{gw.url}'")
        lines.append("    region: eu")
        lines += [f"    {line}" for line in extra.strip().splitlines()]
    lines += [
        "routes:",
        "  - name: deposits",
        "    match: {path_prefix: /v1/deposits, methods: [POST]}",
        "    region: {default: eu}",
        f"    gateways: [{', '.join(gws)}]",
        f"    timeouts: {timeouts}",
        f"    retry: {retry}",
    ]
    lines += [f"    {line}" for line in route_extra.strip().splitlines()]
    return "\n".join(lines) + "\n"


async def admin_gateways(p: Proxy) -> dict[str, dict[str, Any]]:
    async with p.session.get(p.admin_url + "/admin/gateways") as resp:
        assert resp.status == 200
        return {g["name"]: g for g in await resp.json()}


async def admin_post(p: Proxy, path: str) -> tuple[int, dict[str, Any]]:
    async with p.session.post(p.admin_url + path) as resp:
        return resp.status, await resp.json(content_type=None)


async def burst(p: Proxy, n: int, **kw: Any) -> list[tuple[int, dict[str, str], bytes]]:
    return list(await asyncio.gather(*(p.post(**kw) for _ in range(n))))


def fields_of(events: list[Event], gateway: str) -> list[Mapping[str, object]]:
    return [e.fields for e in events if e.fields.get("gateway") == gateway]


async def test_active_check_takes_a_503ing_gateway_out_and_lets_it_back(tmp_path: Path) -> None:
    async with gateways("g1", "g2", "g3") as g:
        checked = f"health_check: {FAST_CHECK}\noutlier: {{slow_start: 100ms}}"
        text = rules(g, gateway_extra=dict.fromkeys(g, checked))
        async with running_proxy(text, tmp_path) as p:
            g1 = p.rt.states["g1"]
            g["g1"].set(mode="status", status=503)
            await eventually(lambda: bool(g1.flags & Flag.ACTIVE_FAILED), within=3)
            view = await admin_gateways(p)
            assert "active_failed" in view["g1"]["flags"]
            assert view["g1"]["health"]["active"]["failing"] is True
            [ejected] = fields_of(p.events.of("gateway.ejected"), "g1")
            assert ejected["source"] == "active"

            before = len(g["g1"].requests())
            results = await burst(p, 30)
            assert [r[0] for r in results] == [200] * 30
            assert {r[1]["X-Payswitch-Gateway"] for r in results} == {"g2", "g3"}
            assert len(g["g1"].requests()) == before, "an actively failed gateway got traffic"

            g["g1"].set(mode="ok")
            await eventually(lambda: not g1.flags & Flag.ACTIVE_FAILED, within=3)
            [restored] = fields_of(p.events.of("gateway.restored"), "g1")
            assert restored["source"] == "active"
            await asyncio.sleep(0.15)  # past the slow-start ramp
            results = await burst(p, 30)
            assert [r[0] for r in results] == [200] * 30
            assert sum(r[1]["X-Payswitch-Gateway"] == "g1" for r in results) >= 5


@pytest.mark.parametrize("fault", ["connect-refused", "503"], ids=["refused", "503"])
async def test_passive_ejection_then_half_open_probe_decides(tmp_path: Path, fault: str) -> None:
    async with gateways("g1", "g2", "g3") as g:
        outlier = "outlier: {consecutive_failures: 3, base_ejection: 300ms, max_ejection: 5s, slow_start: 100ms}"
        # 503 here is the gateway's "not processed": safe to send anywhere, like a refusal.
        retry = "{attempts: 3, on: [connect-failure, 503], not_processed: [503], after_ambiguous: never}"
        text = rules(g, gateway_extra=dict.fromkeys(g, outlier), retry=retry)
        async with running_proxy(text, tmp_path) as p:
            g1 = p.rt.states["g1"]
            if fault == "connect-refused":
                await g["g1"].down()
            else:
                g["g1"].set(mode="status", status=503)
            results = [await p.post() for _ in range(12)]
            assert [r[0] for r in results] == [200] * 12, "a healthy gateway remained"
            assert g1.flags & Flag.EJECTED
            view = await admin_gateways(p)
            assert "ejected" in view["g1"]["flags"]
            assert view["g1"]["health"]["outlier"]["ejected"] is True
            [first] = fields_of(p.events.of("gateway.ejected"), "g1")
            assert first["source"] == "passive"
            assert first["reason"] == "3 consecutive failures"
            assert first["duration_s"] == pytest.approx(0.3)

            # Still broken when half-open: the one probe fails and the ejection doubles.
            await asyncio.sleep(0.35)
            for _ in range(10):
                assert (await p.post())[0] == 200
            second = fields_of(p.events.of("gateway.ejected"), "g1")[1:]
            assert [e["duration_s"] for e in second] == [pytest.approx(0.6)]
            assert str(second[0]["reason"]).startswith("half-open probe failed")

            # Fixed: after the longer ejection, one probe gets through and restores it.
            if fault == "connect-refused":
                await g["g1"].up()
            else:
                g["g1"].set(mode="ok")
            await asyncio.sleep(0.65)
            seen = len(g["g1"].requests())
            for _ in range(10):
                assert (await p.post())[0] == 200
                if not g1.flags & Flag.EJECTED:
                    break
            assert not g1.flags & Flag.EJECTED
            assert len(g["g1"].requests()) == seen + 1, "exactly one half-open probe"
            [restored] = fields_of(p.events.of("gateway.restored"), "g1")
            assert restored == {
                "gateway": "g1",
                "source": "passive",
                "reason": "half-open probe succeeded",
            }
            await asyncio.sleep(0.15)
            results = await burst(p, 30)
            assert sum(r[1]["X-Payswitch-Gateway"] == "g1" for r in results) >= 5


async def test_429_backs_off_for_retry_after_and_is_not_a_failure(tmp_path: Path) -> None:
    async with gateways("g1", "g2", "g3") as g:
        # One failure would eject: the 429s must not count as one.
        outlier = "outlier: {consecutive_failures: 1, base_ejection: 10s}"
        text = rules(g, gateway_extra=dict.fromkeys(g, outlier))
        async with running_proxy(text, tmp_path) as p:
            g1 = p.rt.states["g1"]
            g["g1"].set(mode="throttle", retry_after=1)
            results = [await p.post() for _ in range(3)]
            assert [r[0] for r in results] == [200] * 3, "a 429 is answered by another gateway"
            assert len(g["g1"].requests()) == 1
            assert g1.flags & Flag.THROTTLED
            assert not g1.flags & Flag.EJECTED
            assert g1.failures == 0
            assert p.events.of("gateway.ejected") == []
            [throttled] = p.events.of("gateway.throttled")
            assert throttled.fields == {"gateway": "g1", "retry_after_s": 1.0}
            assert [r[1]["X-Payswitch-Attempts"] for r in results].count("2") == 1

            results = await burst(p, 30)
            assert [r[0] for r in results] == [200] * 30
            assert len(g["g1"].requests()) == 1, "backing off: nothing sent during Retry-After"
            view = await admin_gateways(p)
            assert "throttled" in view["g1"]["flags"]
            assert view["g1"]["health"]["limits"]["throttled_for_s"] > 0

            g["g1"].set(mode="ok")
            await asyncio.sleep(1.05)
            results = await burst(p, 30)
            assert [r[0] for r in results] == [200] * 30
            assert sum(r[1]["X-Payswitch-Gateway"] == "g1" for r in results) >= 5
            assert not g1.flags & Flag.THROTTLED


@pytest.mark.parametrize(
    ("limits", "allowed"),
    [("{max_in_flight: 2}", 2), ("{rate: 1/s, burst: 3}", 3)],
    ids=["in-flight-cap", "token-bucket"],
)
async def test_full_gateway_spills_to_the_next_without_queueing(
    tmp_path: Path, limits: str, allowed: int
) -> None:
    async with gateways("g1", "g2") as g:
        g["g1"].set(delay=0.8)
        text = rules(g, gateway_extra={"g1": f"limits: {limits}\nweight: 5"})
        async with running_proxy(text, tmp_path) as p:

            async def timed() -> tuple[int, str, float]:
                t0 = time.monotonic()
                status, headers, _ = await p.post()
                return status, headers["X-Payswitch-Gateway"], time.monotonic() - t0

            results = await asyncio.gather(*(timed() for _ in range(12)))
            assert [r[0] for r in results] == [200] * 12
            on_g1 = [r for r in results if r[1] == "g1"]
            spilled = [r for r in results if r[1] == "g2"]
            assert len(on_g1) == allowed
            assert len(spilled) == 12 - allowed
            # Spilled requests went straight to g2, not after waiting for g1's slot (which
            # takes g1's 0.8 s at least); 12 requests of one loop took 0.32 s on a busy day.
            assert max(r[2] for r in spilled) < 0.6
            reason = "in-flight-cap" if "in_flight" in limits else "rate-limited"
            metrics = p.rt.registry.get_sample_value(
                "payswitch_gateway_spillovers_total", {"gateway": "g1", "reason": reason}
            )
            assert metrics is not None and metrics >= 12 - allowed


async def _all_actively_failed(tmp_path: Path) -> tuple[int, dict[str, Any], list[Event]]:
    async with gateways("g1", "g2", "g3") as g:
        text = rules(g, gateway_extra=dict.fromkeys(g, f"health_check: {FAST_CHECK}"))
        async with running_proxy(text, tmp_path) as p:
            for gw in g.values():
                gw.set(mode="status", status=503)
            states = [p.rt.states[n] for n in g]
            await eventually(lambda: all(st.flags & Flag.ACTIVE_FAILED for st in states), 3)
            status, _, body = await p.post()
            # A second refused request while the route stays down must not page again.
            assert (await p.post())[0] == 503
            return status, orjson.loads(body), list(p.events.events)


async def test_every_gateway_out_fails_closed_with_503_and_reasons(tmp_path: Path) -> None:
    status, problem, _ = await _all_actively_failed(tmp_path)
    assert status == 503
    assert problem["route"] == "deposits"
    assert problem["region"] == "eu"
    assert {(t["gateway"], t["outcome"]) for t in problem["tried"]} == {
        ("g1", "skipped:active-failed"),
        ("g2", "skipped:active-failed"),
        ("g3", "skipped:active-failed"),
    }


async def test_every_gateway_out_emits_all_down(tmp_path: Path) -> None:
    _, _, events = await _all_actively_failed(tmp_path)
    [down] = [e for e in events if e.kind == "gateway.all_down"]
    assert down.fields == {
        "route": "deposits",
        "region": "eu",
        "reasons": dict.fromkeys(("g1", "g2", "g3"), "active-failed"),
    }


async def test_drain_and_undrain_through_the_admin_api(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g, running_proxy(rules(g), tmp_path) as p:
        status, body = await admin_post(p, "/admin/gateways/g1/drain")
        assert status == 200
        assert body["changed"] is True
        assert "draining" in body["flags"]
        status, body = await admin_post(p, "/admin/gateways/g1/drain")
        assert (status, body["changed"]) == (200, False)
        results = await burst(p, 20)
        assert {r[1]["X-Payswitch-Gateway"] for r in results} == {"g2"}
        assert not g["g1"].requests()

        status, body = await admin_post(p, "/admin/gateways/g1/undrain")
        assert (status, body["changed"]) == (200, True)
        assert "draining" not in (await admin_gateways(p))["g1"]["flags"]
        results = await burst(p, 20)
        assert {r[1]["X-Payswitch-Gateway"] for r in results} == {"g1", "g2"}
        assert p.events.kinds("gateway.") == ["gateway.drained", "gateway.undrained"]

        status, body = await admin_post(p, "/admin/gateways/nope/drain")
        assert status == 404
        assert body["gateway"] == "nope"


@pytest.mark.parametrize("balancing", ["weighted-round-robin", "least-latency"])
async def test_slowing_gateway_loses_its_share_before_any_ejection(
    tmp_path: Path, balancing: str
) -> None:
    async with gateways("g1", "g2") as g:
        degradation = (
            "degradation: {short_window: 300ms, long_window: 30s, latency_ratio: 2,"
            " min_score: 0.05, exploration: 0.02}"
        )
        text = rules(
            g, gateway_extra=dict.fromkeys(g, degradation), route_extra=f"balancing: {balancing}"
        )
        async with running_proxy(text, tmp_path) as p:
            g1 = p.rt.states["g1"]
            # A baseline: past the warm-up (20 samples and one short window per gateway),
            # then until both score 1.0. A stall of this machine (another process, a GC)
            # slows both gateways' answers for a moment and may dip their scores; that
            # passes within a short window and is not what this test is about.
            t_warm = time.monotonic() + 0.5
            t_end = time.monotonic() + 10.0
            states = list(p.rt.states.values())
            while time.monotonic() < t_end:
                await burst(p, 4)
                settled = all(s.score == 1.0 and not s.flags & Flag.DEGRADED for s in states)
                if settled and time.monotonic() >= t_warm:
                    break
            assert g1.score == 1.0
            assert not g1.flags & Flag.DEGRADED
            seen = len(p.events.events)

            g["g1"].set(delay=0.06)  # slower, yet far inside the per-try timeout
            # Within 20 bursts g1's share falls; a stall of this machine meanwhile slows
            # g2's answers too and may hold g1's share up for a short window, so the test
            # waits (up to 60 bursts) for the last 40 answers to show the fall.
            results: list[str] = []
            for n in range(1, 61):
                results += [r[1]["X-Payswitch-Gateway"] for r in await burst(p, 4)]
                if n >= 20 and results[-40:].count("g1") <= 6:
                    break
            late = results[-40:]
            assert late.count("g1") <= 6, f"g1 kept {late.count('g1')}/40 of the traffic"
            assert not g1.flags & Flag.EJECTED
            assert g1.failures == 0
            assert p.events.of("gateway.ejected") == []
            if balancing == "weighted-round-robin":
                # Round robin sees latency only through the predictive score; least-latency
                # already ranks by peak EWMA and may shed g1 before its score moves.
                assert g1.flags & Flag.DEGRADED
                view = await admin_gateways(p)
                assert view["g1"]["score"] < 0.5
                [degraded] = [
                    e
                    for e in p.events.events[seen:]
                    if e.kind == "gateway.degraded" and e.fields["gateway"] == "g1"
                ]
                assert degraded.fields["gateway"] == "g1"
                assert str(degraded.fields["reason"]).startswith("latency")


async def test_least_latency_tries_a_gateway_again_after_one_slow_moment(tmp_path: Path) -> None:
    # One slow moment (here scripted; in production a spike, or a stall of this host) sets
    # g2's peak latency high and its score to the floor. Only answers change either, so a
    # balancer that compared the stale figures would never send g2 a request again.
    async with gateways("g1", "g2") as g:
        degradation = "degradation: {short_window: 300ms, long_window: 30s}"
        text = rules(
            g, gateway_extra=dict.fromkeys(g, degradation), route_extra="balancing: least-latency"
        )
        async with running_proxy(text, tmp_path) as p:
            g2 = p.rt.states["g2"]
            t_end = time.monotonic() + 1.0
            while time.monotonic() < t_end:  # past the warm-up of both
                await burst(p, 4)
            assert g["g2"].requests()

            g["g2"].set(delay=0.3)
            t_end = time.monotonic() + 5.0
            while not g2.flags & Flag.DEGRADED and time.monotonic() < t_end:
                await burst(p, 4)  # until g2's slow answers have degraded it
            g["g2"].set(delay=0.0)
            assert g2.flags & Flag.DEGRADED, f"never degraded: score {g2.score:.2f}"
            assert g2.ewma_latency >= 0.3
            slow_moment = len(g["g2"].requests())

            t_end = time.monotonic() + 10.0
            while time.monotonic() < t_end and g2.flags & Flag.DEGRADED:
                await burst(p, 4)
            assert len(g["g2"].requests()) > slow_moment, "g2 was never tried again"
            assert not g2.flags & Flag.DEGRADED  # cleared at RECOVER_AT: it has recovered


async def test_a_dead_region_goes_out_whole_past_the_ejection_cap(tmp_path: Path) -> None:
    async with gateways("g1", "g2", "g3") as g:
        outlier = "outlier: {consecutive_failures: 3, base_ejection: 10s}"
        text = rules(g, gateway_extra=dict.fromkeys(g, outlier))
        async with running_proxy(text, tmp_path) as p:
            await asyncio.gather(g["g1"].down(), g["g2"].down())
            results = [await p.post() for _ in range(12)]
            assert [r[0] for r in results] == [200] * 12
            # Cap 50% of three is one, but both failed every request while g3 answered.
            assert p.rt.states["g1"].flags & Flag.EJECTED
            assert p.rt.states["g2"].flags & Flag.EJECTED
            results = await burst(p, 20)
            assert {r[1]["X-Payswitch-Attempts"] for r in results} == {"1"}, "dead ones tried"
            assert {r[1]["X-Payswitch-Gateway"] for r in results} == {"g3"}


async def test_a_restarting_gateway_closes_its_connections_and_serves_again() -> None:
    async with gateways("g1") as g:
        async with aiohttp.ClientSession() as session:
            url = g["g1"].url + "/v1/deposits"
            async with session.post(url, data=b"{}") as resp:
                assert resp.status == 200
            restarting = spawn(g["g1"].restart(0.2), name="test-restart")
            await asyncio.sleep(0.05)
            with pytest.raises(aiohttp.ClientConnectionError):
                async with session.post(url, data=b"{}") as resp:
                    await resp.read()
            await restarting
            async with session.post(url, data=b"{}") as resp:
                assert resp.status == 200
