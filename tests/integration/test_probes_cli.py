"""`payswitch run --probes` as a real process: probes and /metrics on their own port,
nothing else there, and readiness failing there as soon as SIGTERM starts the drain."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench.procs import free_port
from tests.support import gateways

REPO = Path(__file__).resolve().parents[2]
GRACE = 1.5

RULES = """\
gateways:
  g1: {{url: '{url}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [g1]
"""


def output(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def status(http: aiohttp.ClientSession, url: str) -> int | None:
    try:
        async with http.get(url) as resp:
            await resp.read()
            return resp.status
    except aiohttp.ClientError:
        return None


async def wait_for(
    http: aiohttp.ClientSession, url: str, want: int, proc: subprocess.Popen[bytes], log: Path
) -> None:
    end = time.monotonic() + 15
    while time.monotonic() < end:
        assert proc.poll() is None, output(log)
        if await status(http, url) == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{url} never answered {want}:\n{output(log)}")


async def test_probes_port_serves_probes_only_and_reports_the_drain(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        rules = tmp_path / "rules"
        rules.mkdir()
        (rules / "rules.yaml").write_text(RULES.format(url=g["g1"].url))
        listen, admin, probes = free_port(), free_port(), free_port()
        log = tmp_path / "payswitch.log"
        env = {
            **os.environ,
            "PAYSWITCH_PROBES": f"127.0.0.1:{probes}",
            "PAYSWITCH_ADMIN_TOKEN": "t0ken",
            "PAYSWITCH_SHUTDOWN_GRACE": str(GRACE),
            "PAYSWITCH_SHUTDOWN_DEADLINE": "2",
        }
        args = ["run", "--rules", str(rules), "--listen", f"127.0.0.1:{listen}"]
        args += ["--admin", f"127.0.0.1:{admin}", "--events", "off", "--access-log", "off"]
        proc = start(args, env, log)
        base = f"http://127.0.0.1:{probes}"
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
                await wait_for(http, f"{base}/readyz", 200, proc, log)
                assert await status(http, f"{base}/healthz") == 200
                assert await status(http, f"{base}/metrics") == 200
                for path in ("/admin/config", "/admin/gateways", "/dashboard"):
                    assert await status(http, base + path) == 404, path
                # The admin port still answers, and wants the token.
                assert await status(http, f"http://127.0.0.1:{admin}/admin/config") == 401
                assert await status(http, f"http://127.0.0.1:{admin}/readyz") == 200

                proc.send_signal(signal.SIGTERM)
                await wait_for(http, f"{base}/readyz", 503, proc, log)
            assert proc.wait(timeout=GRACE + 10) == 0, output(log)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
