"""`payswitch run` as a real process: SIGHUP reloads, SIGTERM drains, bad rules stop it.

Each test starts `python -m proxy run` on free loopback ports with its rules in tmp_path and
simulated gateways in the test's own event loop, talks to it over HTTP, signals it, and
kills it in `finally` whatever happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from bench.procs import free_port
from proxy.aio import spawn
from tests.support import gateways

REPO = Path(__file__).resolve().parents[2]
START_WITHIN = 15.0
GRACE = 1.0  # PAYSWITCH_SHUTDOWN_GRACE: readiness fails, traffic still served
DEADLINE = 2.0  # PAYSWITCH_SHUTDOWN_DEADLINE: in-flight requests get this long


def rules_text(urls: Mapping[str, str], route_to: str) -> str:
    lines = ["gateways:"]
    lines += [f"  {name}: {{url: '{url}', region: eu}}" for name, url in urls.items()]
    lines += [
        "routes:",
        "  - name: deposits",
        "    match: {path_prefix: /v1/deposits, methods: [POST]}",
        "    region: {default: eu}",
        f"    gateways: [{route_to}]",
    ]
    return "\n".join(lines) + "\n"


def payswitch(*args: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PAYSWITCH_SHUTDOWN_GRACE": str(GRACE),
        "PAYSWITCH_SHUTDOWN_DEADLINE": str(DEADLINE),
    }
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    url: str
    admin_url: str
    rules: Path
    log: Path
    http: aiohttp.ClientSession

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    async def get(self, path: str) -> tuple[int, Any]:
        async with self.http.get(self.admin_url + path) as resp:
            return resp.status, await resp.json()

    async def pay(self) -> tuple[int, str | None]:
        async with self.http.post(
            self.url + "/v1/deposits", data=b'{"amount": 100, "currency": "EUR"}'
        ) as resp:
            await resp.read()
            return resp.status, resp.headers.get("X-Payswitch-Gateway")

    async def generation(self) -> int:
        status, view = await self.get("/admin/config")
        assert status == 200
        return int(view["generation"])


async def until(what: str, check: Callable[[], Any], within: float) -> None:
    """Poll the (possibly async) `check` until it is true; fail naming `what`."""
    end = time.monotonic() + within
    while True:
        ok = check()
        if asyncio.iscoroutine(ok):
            ok = await ok
        if ok:
            return
        if time.monotonic() > end:
            raise AssertionError(f"not within {within}s: {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_payswitch(text: str, tmp_path: Path, *flags: str) -> AsyncIterator[Running]:
    rules = tmp_path / "rules"
    rules.mkdir()
    (rules / "rules.yaml").write_text(text, encoding="utf-8")
    listen, admin = free_port(), free_port()
    log = tmp_path / "payswitch.log"
    proc = payswitch(
        "run",
        "--rules",
        str(rules),
        "--listen",
        f"127.0.0.1:{listen}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--events",
        "off",
        "--access-log",
        "off",
        *flags,
        log=log,
    )
    http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
    r = Running(proc, f"http://127.0.0.1:{listen}", f"http://127.0.0.1:{admin}", rules, log, http)
    try:

        async def ready() -> bool:
            assert proc.poll() is None, f"payswitch exited early:\n{r.output()}"
            try:
                return (await r.get("/readyz"))[0] == 200
            except aiohttp.ClientError:
                return False

        await until("payswitch ready", ready, START_WITHIN)
        yield r
    finally:
        await http.close()
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=10)


async def test_sighup_reloads_the_rules_when_not_watching(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        async with running_payswitch(rules_text(urls, "g1"), tmp_path, "--no-watch") as ps:
            assert await ps.pay() == (200, "g1")
            rules = ps.rules / "rules.yaml"
            rules.write_text(rules_text(urls, "g2"), encoding="utf-8")
            await asyncio.sleep(0.3)
            assert await ps.generation() == 1, "--no-watch must not pick up the edit"
            assert await ps.pay() == (200, "g1")

            ps.proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                return await ps.generation() == 2

            await until("SIGHUP reload", reloaded, 5.0)
            _, view = await ps.get("/admin/config")
            assert (view["trigger"], view["last_error"]) == ("signal", None)
            assert await ps.pay() == (200, "g2")

            # A bad edit signalled in is refused with where it is wrong; g2 keeps serving.
            bad = rules_text(urls, "ghost")
            rules.write_text(bad, encoding="utf-8")
            ps.proc.send_signal(signal.SIGHUP)

            async def refused() -> bool:
                return (await ps.get("/admin/config"))[1]["last_error"] is not None

            await until("SIGHUP refusal", refused, 5.0)
            _, view = await ps.get("/admin/config")
            (issue, *_) = view["last_error"]["issues"]
            line = bad.splitlines().index("    gateways: [ghost]") + 1
            assert (issue["file"], issue["line"]) == (str(rules), line)
            assert view["generation"] == 2
            assert await ps.pay() == (200, "g2")
            assert ps.proc.poll() is None


async def test_sigterm_fails_readiness_then_exits_zero(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        # Answers after the grace: only the shutdown deadline lets this payment finish.
        g["g1"].set(delay=GRACE + 0.4)
        async with running_payswitch(rules_text({"g1": g["g1"].url}, "g1"), tmp_path) as ps:
            in_flight = spawn(ps.pay(), name="test-in-flight-payment")
            await until("payment in flight", lambda: len(g["g1"].requests()) == 1, 5.0)
            t0 = time.monotonic()
            ps.proc.send_signal(signal.SIGTERM)

            async def not_ready() -> bool:
                return (await ps.get("/readyz"))[0] == 503

            await until("readiness failing", not_ready, GRACE / 2)
            g["g1"].set(delay=0.0)
            # Kubernetes still routes here for a moment: the grace serves it.
            assert await ps.pay() == (200, "g1")
            assert await in_flight == (200, "g1")

            exited = await asyncio.to_thread(ps.proc.wait, GRACE + DEADLINE + 3)
            elapsed = time.monotonic() - t0
            assert exited == 0, ps.output()
            assert GRACE <= elapsed < GRACE + DEADLINE + 3, elapsed


async def test_invalid_rules_at_start_exit_1_naming_file_and_line(tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    rules.mkdir()
    bad = rules_text({"g1": "http://127.0.0.1:9"}, "ghost")
    (rules / "rules.yaml").write_text(bad, encoding="utf-8")
    listen = free_port()
    log = tmp_path / "payswitch.log"
    proc = payswitch(
        "run",
        "--rules",
        str(rules),
        "--listen",
        f"127.0.0.1:{listen}",
        "--admin",
        f"127.0.0.1:{free_port()}",
        "--events",
        "off",
        log=log,
    )
    try:
        code = await asyncio.to_thread(proc.wait, START_WITHIN)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    out = log.read_text(encoding="utf-8")
    line = bad.splitlines().index("    gateways: [ghost]") + 1
    assert code == 1, out
    assert f"{rules / 'rules.yaml'}:{line}: /routes/0/gateways/0: unknown gateway 'ghost'" in out
    assert "nothing was started" in out
    with socket.socket() as s:
        s.settimeout(1)
        assert s.connect_ex(("127.0.0.1", listen)) != 0, "it must not have listened"


async def test_a_watched_edit_reloads_without_watchfiles_chatter_and_sigterm_exits(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        async with running_payswitch(rules_text(urls, "g1"), tmp_path) as ps:
            # Something writing into the rules directory over and over (a log file, say).
            noise = ps.rules / "notes.txt"
            for i in range(20):
                noise.write_text(f"{i}\n", encoding="utf-8")
                await asyncio.sleep(0.02)
            (ps.rules / "rules.yaml").write_text(rules_text(urls, "g2"), encoding="utf-8")

            async def reloaded() -> bool:
                return await ps.generation() == 2

            await until("watched reload", reloaded, 5.0)
            assert await ps.pay() == (200, "g2")
            ps.proc.send_signal(signal.SIGTERM)
            exited = await asyncio.to_thread(ps.proc.wait, GRACE + DEADLINE + 3)
            assert exited == 0, ps.output()
        out = ps.output()
        assert "change detected" not in out and "changes detected" not in out, out[-2000:]
        assert "rules generation 2 loaded (watch" in out, out[-2000:]
