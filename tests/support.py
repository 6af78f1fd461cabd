"""Shared test harness: a real payswitch (proxy and admin apps on loopback sockets) over
real simulated gateways, and a sink that records events."""

from __future__ import annotations

import asyncio
import contextlib
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from yarl import URL

from proxy.admin import build_admin_app
from proxy.app import Runtime, proxy_runner
from proxy.events import Event, Severity
from proxy.settings import Settings
from proxy.sim import FakeGateway, Ledger


class RecordingSink:
    """Keeps every event it is offered, for assertions."""

    def __init__(self, name: str = "recording") -> None:
        self.name = name
        self.min_severity = Severity.DEBUG
        self.events: list[Event] = []

    @property
    def dropped(self) -> int:
        return 0

    def offer(self, event: Event) -> bool:
        self.events.append(event)
        return True

    async def start(self) -> None:
        return None

    async def close(self, grace: float) -> None:
        return None

    def kinds(self, prefix: str = "") -> list[str]:
        return [e.kind for e in self.events if e.kind.startswith(prefix)]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]


@dataclass
class Proxy:
    rt: Runtime
    url: str
    admin_url: str
    rules_dir: Path
    events: RecordingSink
    session: aiohttp.ClientSession
    runners: list[web.BaseRunner] = field(default_factory=list)

    async def post(
        self, path: str = "/v1/deposits", **kw: Any
    ) -> tuple[int, dict[str, str], bytes]:
        return await self.request("POST", path, **kw)

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        kw.setdefault("data", b'{"amount": 100, "currency": "EUR"}')
        async with self.session.request(method, URL(self.url + path, encoded=True), **kw) as resp:
            return resp.status, dict(resp.headers), await resp.read()


def _port(runner: web.BaseRunner) -> int:
    for addr in runner.addresses:
        return int(addr[1])
    raise RuntimeError("not listening")


@contextlib.asynccontextmanager
async def running_proxy(rules: str, tmp_path: Path, **overrides: Any) -> AsyncIterator[Proxy]:
    """payswitch serving `rules` (YAML text) on loopback ports; torn down on exit."""
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir(exist_ok=True)
    (rules_dir / "rules.yaml").write_text(textwrap.dedent(rules))
    opts: dict[str, Any] = {
        "rules": (str(rules_dir),),
        "listen": ("127.0.0.1", 0),
        "admin": ("127.0.0.1", 0),
        "access_log": False,
        "events": "off",
        "watch": False,
    }
    opts.update(overrides)
    settings = Settings(**opts)
    sink = RecordingSink()
    rt = Runtime(settings, sinks=[sink])
    await rt.start()
    runners: list[web.BaseRunner] = [
        proxy_runner(rt),
        web.AppRunner(build_admin_app(rt), access_log=None),
    ]
    for r in runners:
        await r.setup()
        await web.TCPSite(r, "127.0.0.1", 0).start()
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    proxy = Proxy(
        rt=rt,
        url=f"http://127.0.0.1:{_port(runners[0])}",
        admin_url=f"http://127.0.0.1:{_port(runners[1])}",
        rules_dir=rules_dir,
        events=sink,
        session=session,
        runners=runners,
    )
    try:
        yield proxy
    finally:
        await session.close()
        for r in runners:
            await r.cleanup()
        await rt.close()


@contextlib.asynccontextmanager
async def gateways(
    *names: str, providers: dict[str, str] | None = None
) -> AsyncIterator[dict[str, FakeGateway]]:
    """Started simulated gateways sharing one ledger; stopped on exit."""
    ledger = Ledger()
    gws = {n: FakeGateway(n, provider=(providers or {}).get(n), ledger=ledger) for n in names}
    for g in gws.values():
        await g.start()
    try:
        yield gws
    finally:
        for g in gws.values():
            await g.stop()


async def eventually(
    check: Callable[[], bool], within: float = 5.0, interval: float = 0.02
) -> None:
    """Wait until `check()` holds, failing after `within` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while not check():
        if loop.time() > end:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(interval)
