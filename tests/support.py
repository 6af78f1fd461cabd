"""Shared test harness: a real payswitch (traffic and admin listeners on loopback sockets) over
real simulated gateways, and a sink that records events."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import gc
import select
import socket
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import aiohttp
from yarl import URL

from bench.host import steal_seconds
from proxy import adminhttp
from proxy.admin import start_admin
from proxy.adminhttp import Router
from proxy.app import Runtime, proxy_server, tune_gc
from proxy.events import Event, Severity
from proxy.server import ProxyServer
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
    server: ProxyServer
    admin: ProxyServer

    async def post(
        self, path: str = "/v1/deposits", **kw: Any
    ) -> tuple[int, dict[str, str], bytes]:
        return await self.request("POST", path, **kw)

    async def request(self, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], bytes]:
        kw.setdefault("data", b'{"amount": 100, "currency": "EUR"}')
        async with self.session.request(method, URL(self.url + path, encoded=True), **kw) as resp:
            return resp.status, dict(resp.headers), await resp.read()


@contextlib.contextmanager
def production_gc() -> Iterator[None]:
    """The collector as `payswitch run` leaves it once started: the heap so far frozen, the
    young generation collected less often. For tests that compare a proxy's latencies in
    this process: without it, a full collection of the test runner's own heap (pytest and
    every earlier test's leftovers, 100k objects and more) stalls the shared loop for tens
    of milliseconds and is measured as the proxy's."""
    threshold = gc.get_threshold()
    tune_gc()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*threshold)


class HostSteal:
    """When the hypervisor took CPU from this machine, read every `every` seconds by a
    thread of its own while the block runs. On a shared virtual machine a steal of tens of
    milliseconds delays whatever is in flight, whatever the proxy does; a latency test that
    compares two windows drops, from both, the requests that steal touched, so it compares
    the proxy and not the host. Where the kernel does not count steal, nothing is dropped.
    """

    def __init__(
        self,
        every: float = 0.005,
        settle: float = 0.010,
        read: Callable[[], float | None] = steal_seconds,
    ) -> None:
        self.every = every
        self.read = read
        self.settle = settle  # after a steal, the loop still works off what queued meanwhile
        self._spans: list[tuple[float, float]] = []  # (from, until), monotonic, in order
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="host-steal", daemon=True)

    def __enter__(self) -> HostSteal:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        then, before = time.monotonic(), self.read()
        while not self._stop.wait(self.every):
            now, after = time.monotonic(), self.read()
            if before is not None and after is not None and after > before:
                self._spans.append((then, now + self.settle))
            then, before = now, after

    @property
    def stolen_spans(self) -> int:
        return len(self._spans)

    def touched(self, start: float, end: float) -> bool:
        """Whether steal was counted at any time between `start` and `end` (monotonic);
        answers while the watch runs too. Spans are appended in time order with the same
        settle, so the last one to start before `end` is also the last to end."""
        spans = self._spans
        i = bisect.bisect_left(spans, end, key=lambda span: span[0])
        return i > 0 and spans[i - 1][1] > start


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
    traffic = proxy_server(rt)
    await traffic.start("127.0.0.1", 0)
    admin = await start_admin(rt)
    session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    proxy = Proxy(
        rt=rt,
        url=f"http://127.0.0.1:{traffic.port}",
        admin_url=f"http://127.0.0.1:{admin.port}",
        rules_dir=rules_dir,
        events=sink,
        session=session,
        server=traffic,
        admin=admin,
    )
    try:
        yield proxy
    finally:
        await session.close()
        await traffic.close(60.0)
        await admin.close(5.0)
        await rt.close()


@contextlib.asynccontextmanager
async def serving(router: Router) -> AsyncIterator[str]:
    """`router` on its own listener on loopback, as the admin port serves it; yields the
    base URL."""
    server = await adminhttp.serve(router, "127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{server.port}"
    finally:
        await server.close(5.0)


class Client:
    """An HTTP client of one base URL; answers come back read, so `json()` and `text()`
    work after the connection was released."""

    def __init__(self, base: str, session: aiohttp.ClientSession) -> None:
        self.base = base
        self.session = session

    async def request(self, method: str, path: str, **kw: Any) -> aiohttp.ClientResponse:
        async with self.session.request(method, URL(self.base + path, encoded=True), **kw) as r:
            await r.read()
            return r

    async def get(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, **kw: Any) -> aiohttp.ClientResponse:
        return await self.request("POST", path, **kw)


@contextlib.asynccontextmanager
async def serving_client(router: Router) -> AsyncIterator[Client]:
    """`router` served on loopback, and a client of it."""
    async with serving(router) as base, aiohttp.ClientSession() as session:
        yield Client(base, session)


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


@contextlib.contextmanager
def black_hole() -> Iterator[int]:
    """A loopback port whose listener's accept queue is full and never drained: the kernel
    drops every further SYN, so connect() hangs as it does towards a dead host or a
    firewall. Raises when the queue cannot be filled (connects still complete)."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(0)
    port = srv.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            c = socket.socket()
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                c.connect(("127.0.0.1", port))
            fillers.append(c)
        probe = socket.socket()
        probe.setblocking(False)
        fillers.append(probe)
        with contextlib.suppress(BlockingIOError):
            probe.connect(("127.0.0.1", port))
        _, writable, _ = select.select([], [probe], [], 0.2)
        if writable and probe.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            raise RuntimeError("could not fill the accept queue: connects still complete")
        yield port
    finally:
        for c in fillers:
            c.close()
        srv.close()
