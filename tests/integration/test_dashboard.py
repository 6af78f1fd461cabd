"""The dashboard page over the real admin endpoints, and rendered by a real headless Chromium.

The admin data comes from a real `ConfigStore`, `StateRegistry` and `Health` (flags set as
health sources set them, traffic recorded as the request path records it), served by the
real `/admin/gateways` and `/admin/config` routes next to the dashboard's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import textwrap
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry
from yarl import URL

from proxy import dashboard
from proxy.adminhttp import AdminRequest, Router
from proxy.config import admin as config_admin
from proxy.config.model import Rules
from proxy.config.store import ConfigStore, Snapshot
from proxy.http import Answer
from proxy.metrics import Metrics
from proxy.upstream import admin as gateways_admin
from proxy.upstream.health import Health
from proxy.upstream.state import Flag, Outcome, StateRegistry
from proxy.windows import Windows
from tests.support import Client, serving_client

RULES = textwrap.dedent(
    """\
    gateways:
      stripe-eu: {url: 'http://127.0.0.1:9', region: eu, provider: stripe, weight: 3,
                  limits: {rate: 500/s, burst: 100, max_in_flight: 100}}
      adyen-eu: {url: 'http://127.0.0.1:9', region: eu, provider: adyen}
      worldpay-eu: {url: 'http://127.0.0.1:9', region: eu, provider: worldpay}
      stripe-us: {url: 'http://127.0.0.1:9', region: us, provider: stripe, weight: 2}
      adyen-us: {url: 'http://127.0.0.1:9', region: us, provider: adyen}
      adyen-apac: {url: 'http://127.0.0.1:9', region: apac, provider: adyen}
    routes:
      - name: deposits
        match: {path_prefix: /v1/deposits, methods: [POST]}
        region: {header: X-Region, default: eu, fallback: {eu: [us], us: [eu]}}
        gateways: [stripe-eu, adyen-eu, worldpay-eu, stripe-us, adyen-us, adyen-apac]
        timeouts: {per_try: 300ms, total: 2s}
    """
)

#: What each gateway must show: one of every status the dashboard knows.
EXPECTED_STATUS = {
    "stripe-eu": "up",
    "adyen-eu": "degraded",
    "worldpay-eu": "throttled",
    "stripe-us": "draining",
    "adyen-us": "ejected",
    "adyen-apac": "active-failed",
}
BROKEN_RULES_MESSAGE = "invalid YAML"
BROWSER_TIMEOUT = 30.0


@dataclass
class Admin:
    url: str
    client: Client
    health: Health
    states: StateRegistry


def _route_names(rules: Rules) -> tuple[str, ...]:
    return tuple(r.name for r in rules.routes)


def _traffic_between_polls(
    health: Health, states: StateRegistry
) -> Callable[[AdminRequest], Answer | None]:
    """Before each poll of the gateways, ten requests to stripe-eu as the request path
    reports them, one failing: the browser's virtual clock runs faster than ours, so
    traffic tied to polls is what gives it a steady, non-zero rate to draw."""
    st = states["stripe-eu"]
    sent = 0

    def traffic(request: AdminRequest) -> Answer | None:
        nonlocal sent
        if request.path == "/admin/gateways":
            for _ in range(10):
                sent += 1
                now = health.clock.now()
                health.started(st, now)
                outcome = Outcome.SERVER_ERROR if sent % 10 == 0 else Outcome.SUCCESS
                health.finished(st, outcome, 0.030 + (sent % 7) / 1000, now)
        return None  # let the request through

    return traffic


@contextlib.asynccontextmanager
async def admin_app(tmp_path: Path) -> AsyncIterator[Admin]:
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    (rules_dir / "rules.yaml").write_text(RULES)
    windows: list[Windows] = []
    states = StateRegistry(on_create=lambda st: windows[0].attach(st))
    windows.append(Windows(Metrics(CollectorRegistry()), states))
    health = Health(states)

    def on_swap(new: Snapshot[tuple[str, ...]], old: Snapshot[tuple[str, ...]] | None) -> None:
        created, removed = states.reconcile(new.rules.gateways)
        health.reconcile(created, removed, routes=new.rules.routes)

    store = ConfigStore([rules_dir], _route_names, listeners=[on_swap])
    store.load_initial()

    now = health.clock.now()
    health.drain(states["stripe-us"])
    health.started(states["worldpay-eu"], now)
    health.finished(states["worldpay-eu"], Outcome.THROTTLED, 0.02, now, retry_after=120)
    states["adyen-eu"].score = 0.55
    states["adyen-eu"].set_flag(Flag.DEGRADED, "latency above baseline")
    states["adyen-us"].score = 0.2
    states["adyen-us"].set_flag(Flag.EJECTED, "5 consecutive failures")
    states["adyen-apac"].set_flag(Flag.ACTIVE_FAILED, "3 failed checks")

    # An operator's broken edit: refused, the previous rules keep serving.
    (rules_dir / "rules.yaml").write_text("gateways: [oops\n")
    result = await store.reload("watch")
    assert result.outcome == "failure", result

    # The guard sees every request before it is routed: it stands in for the traffic.
    router = Router(
        [
            *dashboard.routes(windows[0].view),
            *gateways_admin.routes(health, states),
            *config_admin.routes(store),
        ],
        guard=_traffic_between_polls(health, states),
    )
    try:
        async with serving_client(router) as client:
            url = client.base + "/dashboard"
            yield Admin(url=url, client=client, health=health, states=states)
    finally:
        await health.close()


# -- the page and its assets -----------------------------------------------------------


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []
        self.inline_scripts = 0
        self._in_script = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        found = {k: v for k, v in attrs if k in ("src", "href", "action") and v is not None}
        self.urls.extend(found.values())
        if tag == "script" and "src" not in found:
            self._in_script = True
        if any(k.startswith("on") for k, _ in attrs) or any(k == "style" for k, _ in attrs):
            self.inline_scripts += 1

    def handle_data(self, data: str) -> None:
        if self._in_script and data.strip():
            self.inline_scripts += 1

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._in_script = False


def _same_origin(ref: str) -> bool:
    url = URL(ref)
    return not url.is_absolute() and not ref.startswith("//")


async def test_page_uses_only_same_origin_resources(tmp_path: Path) -> None:
    async with admin_app(tmp_path) as admin:
        resp = await admin.client.get("/dashboard")
        assert resp.status == 200
        assert resp.content_type == "text/html"
        assert "connect-src 'self'" in resp.headers["Content-Security-Policy"]
        assert "script-src 'self';" in resp.headers["Content-Security-Policy"]
        html = await resp.text()

        links = _Links()
        links.feed(html)
        assert links.urls, "the page loads its script and stylesheet"
        assert all(_same_origin(u) for u in links.urls), links.urls
        # The policy forbids inline code, so any would silently not run.
        assert links.inline_scripts == 0

        assets: dict[str, str] = {}
        for ref in links.urls:
            asset = await admin.client.get(str(URL("/dashboard").join(URL(ref))))
            assert asset.status == 200, ref
            assets[asset.content_type] = await asset.text()
        assert set(assets) == {"text/javascript", "text/css"}

        everything = html + "".join(assets.values())
        assert not re.search(r"(?i)\b(https?:|wss?:)?//[a-z0-9.-]+[.:]", everything)
        assert "@import" not in assets["text/css"]
        assert "url(" not in assets["text/css"]

        # The script polls exactly the existing admin endpoints, relative to the page.
        polled = set(re.findall(r'getJSON\("([^"]+)"\)', assets["text/javascript"]))
        assert polled == {"admin/gateways", "admin/config", "admin/stats"}
        for path in polled:
            data = await admin.client.get(str(URL("/dashboard").join(URL(path))))
            assert data.status == 200, path
            assert data.content_type == "application/json"


# -- rendered by a real browser --------------------------------------------------------


def _chromium() -> str:
    """The Chromium binary, installed from Debian if missing. Fails, never skips."""
    found = shutil.which("chromium")
    if found:
        return found
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log: list[str] = []
    for cmd in (
        ["apt-get", "install", "-y", "-q", "chromium"],
        ["apt-get", "update", "-q"],
        ["apt-get", "install", "-y", "-q", "chromium"],
    ):
        try:
            run = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.fail(f"cannot install Chromium for the dashboard test: {exc}")
        log.append(f"$ {' '.join(cmd)} -> {run.returncode}\n{run.stderr[-2000:]}")
        if cmd[1] == "install" and run.returncode == 0:
            break
    found = shutil.which("chromium")
    if not found:
        pytest.fail("Chromium is missing and apt-get could not install it:\n" + "\n".join(log))
    return found


def chromium_args(binary: str, profile: Path, *action: str) -> list[str]:
    return [
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={profile}",
        "--virtual-time-budget=3000",
        *action,
    ]


class _Dom(HTMLParser):
    """Text by element id, hidden ids, and the cells of each gateway row."""

    def __init__(self) -> None:
        super().__init__()
        self.texts: dict[str, list[str]] = {}
        self.hidden: set[str] = set()
        self.attrs: dict[str, dict[str, str | None]] = {}
        self.rows: list[list[str]] = []
        self._open: list[tuple[str, str | None]] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        ident = a.get("id")
        if ident:
            self.texts.setdefault(ident, [])
            self.attrs[ident] = a
            if "hidden" in a:
                self.hidden.add(ident)
        if tag in ("meta", "link", "br", "img", "input"):
            return
        self._open.append((tag, ident))
        if tag == "tr" and "gw" in (a.get("class") or "").split():
            self._row = []
        elif tag == "td" and self._row is not None:
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        while self._open:
            t, _ = self._open.pop()
            if t == tag:
                break
        if tag == "td" and self._row is not None and self._cell is not None:
            self._row.append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "tr" and self._row is not None:
            self.rows.append(self._row)
            self._row = None

    def handle_data(self, data: str) -> None:
        for _, ident in self._open:
            if ident:
                self.texts[ident].append(data)
        if self._cell is not None:
            self._cell.append(data)

    def text(self, ident: str) -> str:
        return " ".join("".join(self.texts.get(ident, [])).split())


async def _run(args: list[str]) -> str:
    # Asynchronous: the admin server under test runs on this same event loop.
    proc = await asyncio.create_subprocess_exec(
        *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        async with asyncio.timeout(BROWSER_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        pytest.fail(f"Chromium did not finish within {BROWSER_TIMEOUT}s")
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return out.decode()


@pytest.mark.timeout(900)  # only a first run that has to install Chromium comes near this
async def test_chromium_renders_live_gateway_status(tmp_path: Path) -> None:
    binary = await asyncio.to_thread(_chromium)
    async with admin_app(tmp_path) as admin:
        loop = asyncio.get_running_loop()
        started = loop.time()
        html = await _run(chromium_args(binary, tmp_path / "profile", "--dump-dom", admin.url))
        assert loop.time() - started < 20, "the browser run is too slow for the suite"

    dom = _Dom()
    dom.feed(html)
    assert dom.text("conn") == "live", html[:2000]

    by_name = {cells[0]: cells for cells in dom.rows}
    assert list(by_name) == list(EXPECTED_STATUS)
    for name, status in EXPECTED_STATUS.items():
        cells = by_name[name]
        assert cells[3].split()[0] == status, cells
    stripe = by_name["stripe-eu"]
    assert stripe[1:3] == ["eu", "stripe"]
    assert int(stripe[9].replace(",", "")) > 0, "requests"
    assert re.fullmatch(r"[\d,]+ / [\d,]+", stripe[10]), stripe[10]  # failures 1m / 5m
    assert int(stripe[10].split(" / ")[0].replace(",", "")) > 0, "one in ten failed"
    assert stripe[7].endswith("ms"), stripe[7]
    assert float(stripe[8]) > 0, "request rate of the busy gateway"

    assert dom.text("generation") == "1"
    assert dom.text("gw-count") == "6"
    # Up as payswitch_gateway_up counts it: only ejected and active-failed are down...
    assert dom.text("up-count") == "4"
    # ...while drained and throttled gateways are up but take no traffic.
    assert dom.text("eligible-count") == "2"
    assert dom.text("last-reload") == "refused"
    assert "reload-error" not in dom.hidden
    assert "Last reload refused" in dom.text("reload-error")
    assert "Still serving generation 1" in dom.text("reload-error-detail")
    assert BROKEN_RULES_MESSAGE in dom.text("reload-error-issues")
    assert float(dom.text("rate")) > 0
    assert len((dom.attrs["spark-req"].get("points") or "").split()) >= 2, "sparkline"
