from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import socket
from collections.abc import AsyncIterator

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from proxy.clock import ManualClock
from proxy.config.model import HealthCheck
from proxy.events import Severity
from proxy.upstream.active import FAILING_INTERVAL, JITTER, USER_AGENT, ActiveChecker, probe_url
from proxy.upstream.client import UpstreamClient
from proxy.upstream.state import Flag, GatewayState
from tests.unit.upstream.health_support import Recorder, gateway


@contextlib.asynccontextmanager
async def probe_client() -> AsyncIterator[UpstreamClient]:
    """The upstream client the checkers share, as Health makes it."""
    client = UpstreamClient(idle_timeout=30.0, max_idle=2)
    try:
        yield client
    finally:
        await client.close()


HC = HealthCheck(
    path="/health", interval=1.0, timeout=0.5, healthy_threshold=2, unhealthy_threshold=3
)


def _checker(
    hc: HealthCheck = HC, *, port: int = 8080, base_path: str = ""
) -> tuple[ActiveChecker, GatewayState, Recorder, ManualClock]:
    clock = ManualClock()
    st = GatewayState(gateway(port=port, base_path=base_path, health_check=hc))
    rec = Recorder()
    restored: list[str] = []
    checker = ActiveChecker(
        st, clock=clock, events=rec, on_restored=lambda s: restored.append(s.name)
    )
    return checker, st, rec, clock


@pytest.mark.parametrize(
    ("results", "failing"),
    [
        ("FF", "00"),
        ("FFF", "001"),
        ("FFSFF", "00000"),  # a pass in between resets the count: no flap
        ("FFFS", "0011"),  # one pass is not enough to come back
        ("FFFSS", "00110"),
        ("FFFSFSS", "0011110"),  # a fail in between resets the passes
        ("FFFSSFFSF", "001100000"),
    ],
    ids=["below", "down", "reset", "one-pass", "back", "pass-reset", "no-flap"],
)
def test_thresholds(results: str, failing: str) -> None:
    checker, st, _, _ = _checker()
    seen = ""
    for r in results:
        checker.record(r == "S", "status 200" if r == "S" else "status 503")
        seen += "1" if st.flags & Flag.ACTIVE_FAILED else "0"
    assert seen == failing


@pytest.mark.parametrize(
    ("results", "failing"),
    [
        # Back after 2 passes, down again 3 s later (calm is 4 s): 4 passes to return.
        ("FFFSSFFFSSSS", "001100011110"),
        # Up for 7 s before failing again: forgiven, 2 passes are enough once more.
        ("FFFSSSSSSFFFSS", "00110000000110"),
        # Still flapping after 4 passes: 8 needed next time.
        ("FFFSSFFFSSSSFFFSSSSSSSS", "00110001111000111111110"),
    ],
    ids=["flapping-doubles", "calm-forgives", "keeps-doubling"],
)
def test_a_gateway_down_again_soon_needs_more_passes(results: str, failing: str) -> None:
    checker, st, _, clock = _checker()
    seen = ""
    for r in results:
        clock.advance(HC.interval)
        checker.record(r == "S", "status 200" if r == "S" else "status 503")
        seen += "1" if st.flags & Flag.ACTIVE_FAILED else "0"
    assert seen == failing


def test_passes_needed_are_capped_and_said_in_the_reason() -> None:
    checker, _, rec, clock = _checker()
    needed = []
    for _ in range(7):
        for _ in range(HC.unhealthy_threshold):
            clock.advance(HC.interval)
            checker.record(False, "status 503")
        needed.append(checker.status().passes_needed)
        for _ in range(needed[-1]):
            assert checker.failing
            clock.advance(HC.interval)
            checker.record(True, "status 200")
        assert not checker.failing
    assert needed == [2, 4, 8, 16, 32, 32, 32]
    reasons = [f["reason"] for f in rec.of("gateway.ejected")]
    assert reasons[0] == "3 health checks failed, last: status 503"
    assert reasons[1] == (
        "3 health checks failed, last: status 503; down again soon after returning,"
        " 4 passes to return"
    )


def test_transitions_emit_active_events_and_start_the_ramp() -> None:
    clock = ManualClock()
    st = GatewayState(gateway(health_check=HC))
    rec = Recorder()
    restored: list[str] = []
    checker = ActiveChecker(
        st, clock=clock, events=rec, on_restored=lambda s: restored.append(s.name)
    )
    for _ in range(3):
        checker.record(False, "status 503")
    checker.record(True, "status 200")
    checker.record(True, "status 200")
    assert rec.events == [
        (
            "gateway.ejected",
            Severity.CRITICAL,
            {
                "gateway": "g1",
                "source": "active",
                "reason": "3 health checks failed, last: status 503",
                "duration_s": None,
            },
        ),
        (
            "gateway.restored",
            Severity.INFO,
            {"gateway": "g1", "source": "active", "reason": "2 health checks passed"},
        ),
    ]
    assert restored == ["g1"]
    clock.advance(2.0)
    status = checker.status()
    assert (status.failing, status.consecutive_successes, status.last_result) == (
        False,
        2,
        "status 200",
    )
    assert status.last_checked_ago_s == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("base_path", "path", "url"),
    [
        ("", "/health", "http://127.0.0.1:8080/health"),
        ("/psp", "/status", "http://127.0.0.1:8080/psp/status"),
    ],
    ids=["plain", "base-path"],
)
def test_probe_url(base_path: str, path: str, url: str) -> None:
    gw = gateway(base_path=base_path)
    assert probe_url(gw, HealthCheck(path=path)) == url


class _Scripted(ActiveChecker):
    """A checker whose probes answer from a script instead of the network."""

    def __init__(self, st: GatewayState, script: list[bool], sleeps: list[float]) -> None:
        async def sleep(seconds: float) -> None:
            sleeps.append(seconds)
            if len(sleeps) > len(script):
                # The operator removed the health check: the loop must end by itself.
                st.gateway = dataclasses.replace(st.gateway, health_check=None)

        super().__init__(
            st, clock=ManualClock(), events=Recorder(), sleep=sleep, rng=random.Random(7)
        )
        self._script = iter(script)

    async def probe_once(self, client: UpstreamClient) -> bool:
        ok = next(self._script)
        self.record(ok, "scripted")
        return ok


async def test_loop_sleeps_the_interval_with_jitter_and_stops_when_removed() -> None:
    st = GatewayState(gateway(health_check=HC))
    sleeps: list[float] = []
    checker = _Scripted(st, [False, False, False, True], sleeps)
    async with probe_client() as session:
        await asyncio.wait_for(checker.run(session), timeout=5)
    first, *rest = sleeps
    assert 0 <= first <= HC.interval * JITTER
    assert len(rest) == 4
    # Two probes at the interval; failing after the third, it is probed twice as often.
    intervals = [HC.interval, HC.interval, HC.interval * FAILING_INTERVAL, HC.interval * 0.5]
    assert all(i <= s <= i * (1 + JITTER) for s, i in zip(rest, intervals, strict=True))
    assert len(set(rest)) > 1  # jittered, not lockstep
    assert st.flags & Flag.ACTIVE_FAILED


async def test_probe_against_a_real_gateway_that_goes_bad(aiohttp_server: AiohttpServer) -> None:
    paths: list[str] = []

    async def health(request: web.Request) -> web.Response:
        paths.append(request.path)
        return web.Response(status=200 if len(paths) <= 2 else 503)

    app = web.Application()
    app.router.add_get("/psp/health", health)
    server = await aiohttp_server(app)
    hc = HealthCheck(
        path="/health", interval=0.01, timeout=1.0, healthy_threshold=1, unhealthy_threshold=2
    )
    checker, st, rec, _ = _checker(hc, port=server.port or 0, base_path="/psp")
    down = asyncio.Event()
    st.subscribe(lambda _st, change: down.set() if change.flag is Flag.ACTIVE_FAILED else None)
    async with probe_client() as session:
        checker.start(session)
        try:
            await asyncio.wait_for(down.wait(), timeout=5)
        finally:
            await checker.stop()
    assert not checker.running
    assert paths[:4] == ["/psp/health"] * 4
    assert rec.kinds() == ["gateway.ejected"]
    assert rec.of("gateway.ejected")[0]["reason"] == "2 health checks failed, last: status 503"


@pytest.mark.parametrize(
    ("status", "ok"),
    [(200, True), (204, True), (301, False), (500, False)],
    ids=["ok", "no-content", "redirect-not-followed", "error"],
)
async def test_probe_once_expected_statuses(
    aiohttp_server: AiohttpServer, status: int, ok: bool
) -> None:
    async def health(request: web.Request) -> web.Response:
        headers = {"Location": "/health"} if status == 301 else None
        return web.Response(status=status, headers=headers)

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    checker, _, _, _ = _checker(port=server.port or 0)
    async with probe_client() as session:
        assert await checker.probe_once(session) is ok
    assert checker.status().last_result == f"status {status}"


async def test_probe_once_takes_a_429_as_no_verdict(aiohttp_server: AiohttpServer) -> None:
    answers = iter([200, 200, 429, 429, 429, 429, 503])

    async def health(request: web.Request) -> web.Response:
        return web.Response(status=next(answers), headers={"Retry-After": "5"})

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    hc = dataclasses.replace(HC, unhealthy_threshold=1)
    checker, st, rec, _ = _checker(hc, port=server.port or 0)
    async with probe_client() as session:
        assert [await checker.probe_once(session) for _ in range(6)] == [True, True] + [False] * 4
        # Busy is not down: four 429s in a row leave a one-failure threshold untouched.
        assert not st.flags & Flag.ACTIVE_FAILED
        assert checker.status().consecutive_failures == 0
        assert checker.status().last_result == "status 429, no verdict"
        assert rec.events == []
        await checker.probe_once(session)
    assert st.flags & Flag.ACTIVE_FAILED


async def test_probe_once_counts_a_refused_connection_as_failed() -> None:
    with socket.socket() as sock:  # a port nobody listens on once closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    checker, _, _, _ = _checker(port=port)
    async with probe_client() as session:
        assert await checker.probe_once(session) is False
    assert checker.status().consecutive_failures == 1
    assert "Connect" in str(checker.status().last_result)


async def test_probe_once_counts_a_slow_answer_as_failed(aiohttp_server: AiohttpServer) -> None:
    release = asyncio.Event()

    async def health(request: web.Request) -> web.Response:
        await release.wait()
        return web.Response()

    app = web.Application()
    app.router.add_get("/health", health)
    server = await aiohttp_server(app)
    checker, _, _, _ = _checker(dataclasses.replace(HC, timeout=0.05), port=server.port or 0)
    async with probe_client() as session:
        assert await checker.probe_once(session) is False
    release.set()
    assert checker.status().last_result == "timeout after 0.05s"


PROBES = {
    # method, body size of the answer, whether the connection is kept for the next probe
    "GET, small body": ("GET", 10, True),
    "HEAD": ("HEAD", 10, True),
    "GET, body over what a probe keeps": ("GET", 200_000, False),
}


@pytest.mark.parametrize(("method", "size", "kept"), PROBES.values(), ids=PROBES)
async def test_probe_sends_a_plain_request_and_keeps_only_a_finished_connection(
    aiohttp_server: AiohttpServer, method: str, size: int, kept: bool
) -> None:
    seen: list[tuple[str, str, str | None]] = []

    async def health(request: web.Request) -> web.Response:
        seen.append((request.method, request.path, request.headers.get("User-Agent")))
        return web.Response(body=b"x" * size)

    app = web.Application()
    app.router.add_route(method, "/health", health)
    server = await aiohttp_server(app)
    checker, _, _, _ = _checker(dataclasses.replace(HC, method=method), port=server.port or 0)
    async with probe_client() as client:
        assert await checker.probe_once(client) is True
        origin = ("http", "127.0.0.1", server.port or 0)
        await asyncio.sleep(0.01)
        assert client.idle_count(origin) == (1 if kept else 0)
        assert await checker.probe_once(client) is True
    assert seen == [(method, "/health", USER_AGENT)] * 2
