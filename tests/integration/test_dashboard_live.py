"""The dashboard of a real proxy under a scripted fault, driven in headless Chromium.

Chromium is driven over the DevTools protocol (a websocket from this test): the page is
loaded from a real payswitch admin listener, a gateway is broken while traffic flows, a
screenshot is taken, the page's numbers are compared with /metrics, and a real mouse
click on "drain" (with the admin token typed into the page) drains the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.upstream.state import Flag
from proxy.windows import is_failure, quantile
from tests.integration.test_dashboard import _chromium
from tests.support import Proxy, gateways, running_proxy

REPO = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-admin-token"
RULES = """
gateways:
  g1: {{url: '{g1}', region: eu, provider: stripe}}
  g2: {{url: '{g2}', region: eu, provider: adyen}}
  g3: {{url: '{g3}', region: eu, provider: worldpay}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [g1, g2, g3]
  - name: lookups
    match: {{path_prefix: /v1/lookups}}
    region: {{default: eu}}
    gateways: [g2, g3]
"""
ATTEMPT_FAILURES = ("connect-failure", "timeout", "reset", "bad-response", "server-error")


class Page:
    """One Chromium tab over the DevTools protocol."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self._ws = ws
        self._ids = itertools.count(1)

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        await self._ws.send_json({"id": ident, "method": method, "params": params})
        async with asyncio.timeout(20):
            while True:
                msg = json.loads((await self._ws.receive()).data)
                if msg.get("id") == ident:
                    assert "error" not in msg, msg
                    result: dict[str, Any] = msg["result"]
                    return result

    async def eval(self, expression: str) -> Any:
        out = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in out, out
        return out["result"].get("value")

    async def until(self, what: str, expression: str, within: float = 15.0) -> Any:
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        guarded = f"(() => {{ try {{ return ({expression}); }} catch (e) {{ return false; }} }})()"
        while True:
            value = await self.eval(guarded)
            if value:
                return value
            if loop.time() > end:
                raise AssertionError(f"page: not within {within}s: {what}")
            await asyncio.sleep(0.2)

    async def click(self, selector: str) -> None:
        """A real mouse click at the middle of the element, as a person would."""
        box = await self.eval(
            f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
            ".getBoundingClientRect(); return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call(
                "Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1
            )

    async def type_into(self, selector: str, text: str) -> None:
        await self.eval(f"document.querySelector({json.dumps(selector)}).focus()")
        await self.call("Input.insertText", text=text)

    async def screenshot(self, path: Path) -> None:
        shot = await self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(_write, path, base64.b64decode(shot["data"]))


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _devtools_port(profile: Path) -> int | None:
    """The port Chromium chose, once it has written it down."""
    try:
        text = (profile / "DevToolsActivePort").read_text()
    except FileNotFoundError:
        return None
    return int(text.split()[0]) if text.strip() else None


@asynccontextmanager
async def chromium_page(url: str, profile: Path) -> AsyncIterator[Page]:
    binary = await asyncio.to_thread(_chromium)
    proc = await asyncio.create_subprocess_exec(
        binary,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--hide-scrollbars",
        "--window-size=1440,1300",
        "--remote-debugging-address=127.0.0.1",
        "--remote-debugging-port=0",
        f"--user-data-dir={profile}",
        url,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        port: int | None = None
        async with asyncio.timeout(20):
            while port is None:
                await asyncio.sleep(0.1)
                port = await asyncio.to_thread(_devtools_port, profile)
        async with aiohttp.ClientSession() as http:
            async with asyncio.timeout(20):
                while True:
                    async with http.get(f"http://127.0.0.1:{port}/json/list") as resp:
                        tabs = [t for t in await resp.json() if t.get("type") == "page"]
                    if tabs:
                        break
                    await asyncio.sleep(0.1)
            async with http.ws_connect(tabs[0]["webSocketDebuggerUrl"], max_msg_size=0) as ws:
                yield Page(ws)
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def _traffic(p: Proxy, stop: asyncio.Event) -> None:
    i = 0
    while not stop.is_set():
        i += 1
        await p.post(headers={"Idempotency-Key": f"live-{i}"})
        if i % 3 == 0:
            await p.request("GET", "/v1/lookups/1", data=b"")
        await asyncio.sleep(0.01)


def _parse(text: str) -> list[tuple[str, dict[str, str], float]]:
    out = []
    for line in text.splitlines():
        if line.startswith("#") or not line.strip():
            continue
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        assert m, line
        labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out.append((m.group(1), labels, float(m.group(3))))
    return out


@pytest.mark.timeout(300)
async def test_dashboard_after_a_fault_agrees_with_metrics_and_drain_click_drains(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2", "g3") as g:
        rules = RULES.format(g1=g["g1"].url, g2=g["g2"].url, g3=g["g3"].url)
        # Admin on loopback with no token, as `make run` serves it (the test below sets one).
        async with running_proxy(rules, tmp_path) as p:
            stop = asyncio.Event()
            traffic = asyncio.gather(_traffic(p, stop))
            try:
                await asyncio.sleep(1.0)
                # The scripted fault: g1 refuses connections and is ejected; g3 turns slow.
                await g["g1"].down()
                g["g3"].set(delay=0.05)
                await asyncio.sleep(2.5)
                url = p.admin_url + "/dashboard"
                async with chromium_page(url, tmp_path / "profile") as page:
                    await page.until(
                        "live", "document.getElementById('conn').textContent === 'live'"
                    )
                    await page.until(
                        "g1 shown ejected",
                        "[...document.querySelectorAll('tr.gw')].some(r => "
                        "r.cells[0].textContent.includes('g1') && "
                        "r.cells[3].textContent.startsWith('ejected'))",
                    )
                    await page.until(
                        "route rows",
                        "document.querySelectorAll('#route-rows tr.route').length === 2",
                    )
                    await page.until(
                        "a warning in the event tail",
                        "[...document.querySelectorAll('#events li')]"
                        ".some(li => li.textContent.includes('gateway.ejected'))",
                    )
                    await asyncio.sleep(1.2)  # one more poll with the sparkline filled in
                    for path in (
                        tmp_path / "dashboard-fault.png",
                        REPO / "bench" / "out" / "dashboard-fault.png",
                    ):
                        await page.screenshot(path)

                    # What the page shows agrees with /metrics, read at the same moment.
                    stop.set()
                    await traffic
                    await asyncio.sleep(1.5)  # a poll after the last request
                    shown = await page.eval(
                        "({up: document.getElementById('up-count').textContent,"
                        " total: document.getElementById('gw-count').textContent,"
                        " ejectedSince: [...document.querySelectorAll('tr.gw')]"
                        ".find(r => r.cells[0].textContent.includes('g1'))"
                        ".cells[3].querySelector('.since').textContent})"
                    )
                    async with p.session.get(p.admin_url + "/metrics") as resp:
                        samples = _parse(await resp.text())
                    async with p.session.get(p.admin_url + "/admin/stats") as resp:
                        stats = await resp.json()
                    up = sum(v for n, _, v in samples if n == "payswitch_gateway_up")
                    assert (int(shown["up"]), int(shown["total"])) == (int(up), 3)
                    assert (
                        "consecutive" in shown["ejectedSince"] or "failure" in shown["ejectedSince"]
                    )
                    _agrees(stats, samples)

                    # Drain g2 with a click, the token typed into the page.
                    await page.type_into("#token", TOKEN)
                    await page.click('button.act-btn[data-gateway="g2"]')
                    for _ in range(50):
                        if p.rt.states["g2"].flags & Flag.DRAINING:
                            break
                        await asyncio.sleep(0.1)
                    assert p.rt.states["g2"].flags & Flag.DRAINING, "the click drained g2"
                    await page.until(
                        "button turns to undrain",
                        "document.querySelector('button.act-btn[data-gateway=\"g2\"]')"
                        ".textContent === 'undrain'",
                    )
                    await page.click('button.act-btn[data-gateway="g2"]')
                    for _ in range(50):
                        if not p.rt.states["g2"].flags & Flag.DRAINING:
                            break
                        await asyncio.sleep(0.1)
                    assert not p.rt.states["g2"].flags & Flag.DRAINING, "undrain restored g2"
            finally:
                stop.set()
                await traffic


def _agrees(stats: dict[str, Any], samples: list[tuple[str, dict[str, str], float]]) -> None:
    """Every figure of the 5 m window equals what PromQL would compute from /metrics (the
    whole run is inside the window and began at zero)."""
    routes = {r["route"]: r["5m"] for r in stats["routes"]}
    assert set(routes) == {"deposits", "lookups"}
    for route, window in routes.items():
        total = sum(
            v for n, lb, v in samples if n == "payswitch_requests_total" and lb["route"] == route
        )
        failed = sum(
            v
            for n, lb, v in samples
            if n == "payswitch_requests_total"
            and lb["route"] == route
            and is_failure(lb["outcome"])
        )
        assert window["requests"] == total > 0
        assert window["success_rate"] == pytest.approx(1 - failed / total, abs=1e-4)
        cumulative: dict[str, float] = {}
        for n, lb, v in samples:
            if n == "payswitch_request_duration_seconds_bucket" and lb["route"] == route:
                cumulative[lb["le"]] = cumulative.get(lb["le"], 0) + v
        les = sorted(cumulative, key=lambda le: float("inf") if le == "+Inf" else float(le))
        per_bucket = [
            cumulative[le] - (cumulative[les[i - 1]] if i else 0) for i, le in enumerate(les)
        ]
        p99 = quantile(0.99, [int(x) for x in per_bucket])
        assert p99 is not None
        assert window["p99_ms"] == pytest.approx(p99 * 1000, abs=1e-3)
    by_gateway = {gw["name"]: gw for gw in stats["gateways"]}
    for name in ("g1", "g2", "g3"):
        failures = sum(
            v
            for n, lb, v in samples
            if n == "payswitch_attempts_total"
            and lb["gateway"] == name
            and lb["outcome"] in ATTEMPT_FAILURES
        )
        assert by_gateway[name]["5m"]["failures"] == failures, name
    assert by_gateway["g1"]["status"] == "ejected"
    assert by_gateway["g1"]["5m"]["failures"] > 0


@pytest.mark.timeout(120)
async def test_dashboard_behind_a_token_shows_nothing_until_it_is_typed_then_everything(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2", "g3") as g:
        rules = RULES.format(g1=g["g1"].url, g2=g["g2"].url, g3=g["g3"].url)
        async with running_proxy(rules, tmp_path, admin_token=TOKEN) as p:
            url = p.admin_url + "/dashboard"
            async with chromium_page(url, tmp_path / "profile") as page:
                await page.until(
                    "asks for the token",
                    "document.getElementById('conn').textContent.includes('admin token')",
                )
                await page.until(
                    "tail asks for the token",
                    "document.getElementById('tail-state').textContent === 'needs the admin token'",
                )
                assert await page.eval("document.querySelectorAll('tr.gw').length") == 0

                await page.type_into("#token", TOKEN)
                await page.until(
                    "live with the token", "document.getElementById('conn').textContent === 'live'"
                )
                await page.until("gateway rows", "document.querySelectorAll('tr.gw').length === 3")
                await page.until(
                    "tail live with the token",
                    "document.getElementById('tail-state').textContent === 'live'",
                )
                # An event made after the tail opened reaches the page through it (a drain
                # is info: the tail is switched to info, which reopens it with the token).
                await page.eval(
                    "(() => { const s = document.getElementById('severity'); s.value = 'info';"
                    " s.dispatchEvent(new Event('change')); })()"
                )
                await page.until(
                    "tail live at info",
                    "document.getElementById('tail-state').textContent === 'live'",
                )
                await page.click('button.act-btn[data-gateway="g2"]')
                await page.until(
                    "the drain in the event tail",
                    "[...document.querySelectorAll('#events li')]"
                    ".some(li => li.textContent.includes('gateway.drained'))",
                )
                assert p.rt.states["g2"].flags & Flag.DRAINING
