"""Log outputs of a real `payswitch run`: a stuck stdout never freezes it, every line is JSON.

A FIFO that is opened and never read stands for a log shipper that stopped: traffic,
/metrics and SIGTERM must carry on, with the lost lines counted. Under a Redis outage, a
refused reload and a crash-looping gateway, every line on stdout and stderr must parse as
one JSON object.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

from bench.procs import free_port
from proxy.aio import spawn
from tests.integration.test_reload_cli import (
    DEADLINE,
    GRACE,
    REPO,
    rules_text,
    until,
)
from tests.support import gateways

KEYED_RULES_TAIL = "    idempotency: {header: Idempotency-Key, ttl: 1h}\n"


def start(
    rules: Path,
    listen: int,
    admin: int,
    stdout: int,
    stderr: int,
    *flags: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """`payswitch run` on `rules`, its outputs on the given descriptors."""
    env = {
        **(os.environ if env is None else env),
        "PAYSWITCH_SHUTDOWN_GRACE": str(GRACE),
        "PAYSWITCH_SHUTDOWN_DEADLINE": str(DEADLINE),
    }
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "proxy", "run", "--rules", str(rules)),
            *("--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"),
            *flags,
        ],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=stdout,
        stderr=stderr,
    )


async def _ready(http: aiohttp.ClientSession, admin: str, proc: subprocess.Popen[bytes]) -> None:
    async def ok() -> bool:
        assert proc.poll() is None, "payswitch exited early"
        try:
            async with http.get(admin + "/readyz") as resp:
                return resp.status == 200
        except aiohttp.ClientError:
            return False

    await until("payswitch ready", ok, 15.0)


def _metric(text: str, name: str, label: str) -> float:
    for line in text.splitlines():
        if line.startswith(name) and label in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name}{{{label}}} not in /metrics")


async def test_a_fifo_nobody_reads_freezes_neither_traffic_metrics_nor_sigterm(
    tmp_path: Path,
) -> None:
    fifo = tmp_path / "stdout.fifo"
    os.mkfifo(fifo)
    # Opened (so the writer's open succeeds and writes fill the pipe) and never read.
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    writer = os.open(fifo, os.O_WRONLY)
    rules = tmp_path / "rules"
    rules.mkdir()
    listen, admin = free_port(), free_port()
    async with gateways("g1") as g:
        (rules / "rules.yaml").write_text(rules_text({"g1": g["g1"].url}, "g1"), encoding="utf-8")
        proc = start(rules, listen, admin, writer, writer, "--log-level", "debug")
        os.close(writer)
        http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
        try:
            await _ready(http, f"http://127.0.0.1:{admin}", proc)
            served = 0

            async def client() -> None:
                nonlocal served
                body = b'{"amount": 100, "currency": "EUR", "note": "' + b"x" * 400 + b'"}'
                for _ in range(400):
                    async with http.post(
                        f"http://127.0.0.1:{listen}/v1/deposits", data=body
                    ) as resp:
                        await resp.read()
                        assert resp.status == 200
                        served += 1

            started = time.monotonic()
            await asyncio.gather(*(spawn(client(), name=f"client-{i}") for i in range(20)))
            took = time.monotonic() - started
            assert served == 8000, "every request was answered"
            async with http.get(f"http://127.0.0.1:{admin}/metrics") as resp:
                assert resp.status == 200
                metrics = await resp.text()
            assert _metric(metrics, "payswitch_log_lines_dropped_total", 'output="stdout"') > 0
            assert _metric(metrics, "payswitch_requests_total", 'route="deposits"') == 8000

            proc.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = await asyncio.to_thread(proc.wait, GRACE + DEADLINE + 5)
            exited = time.monotonic() - signalled
            assert code == 0
            assert exited < GRACE + DEADLINE + 5, f"exit took {exited:.1f}s"
            assert took < 60, f"8000 requests took {took:.1f}s with stdout stuck"
        finally:
            await http.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            os.close(reader)


async def test_every_line_is_json_under_redis_outage_refused_reload_and_crashing_gateway(
    tmp_path: Path,
) -> None:
    with socketless_port() as closed:
        rules = tmp_path / "rules"
        rules.mkdir()
        listen, admin = free_port(), free_port()
        out_path, err_path = tmp_path / "stdout", tmp_path / "stderr"
        async with gateways("g1", "g2") as g:
            urls = {n: gw.url for n, gw in g.items()}
            keyed = rules_text(urls, "g1, g2") + KEYED_RULES_TAIL
            (rules / "rules.yaml").write_text(keyed, encoding="utf-8")
            with out_path.open("wb") as out, err_path.open("wb") as err:
                proc = start(
                    rules,
                    listen,
                    admin,
                    out.fileno(),
                    err.fileno(),
                    "--idempotency-store",
                    f"redis://127.0.0.1:{closed}/0",
                    "--no-watch",
                )
            http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5))
            base = f"http://127.0.0.1:{listen}/v1/deposits"
            try:
                await _ready(http, f"http://127.0.0.1:{admin}", proc)
                statuses = []
                for i in range(10):  # the Redis outage: keyed payments cannot be claimed
                    async with http.post(base, headers={"Idempotency-Key": f"k{i}"}) as resp:
                        statuses.append(resp.status)
                assert all(s >= 500 for s in statuses), statuses
                # A refused reload, with a multi-line reason.
                (rules / "rules.yaml").write_text(rules_text(urls, "ghost"), encoding="utf-8")
                proc.send_signal(signal.SIGHUP)
                # A crash-looping gateway: resets, down, garbage, back, again and again.
                for mode in ("reset", "garbage", "midbody", "ok") * 3:
                    g["g1"].set(mode=mode)
                    for _ in range(3):
                        async with http.post(base) as resp:
                            await resp.read()
                    await asyncio.sleep(0.05)
            finally:
                await http.close()
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
                    await asyncio.to_thread(proc.wait, GRACE + DEADLINE + 5)
    stdout = out_path.read_bytes().splitlines()
    stderr = err_path.read_bytes().splitlines()
    assert stdout and stderr
    for name, lines in (("stdout", stdout), ("stderr", stderr)):
        for line in lines:
            try:
                obj = json.loads(line)
            except ValueError:
                raise AssertionError(f"{name}: not JSON: {line[:300]!r}") from None
            assert isinstance(obj, dict), line
            assert obj["time"].endswith("Z"), line
    app = [json.loads(x) for x in stderr]
    assert any("exception" in x for x in app), "the Redis failure's traceback is a field"
    assert any(x.get("kind") == "config.rejected" for x in map(json.loads, stdout))
    assert any(x.get("log") == "access" for x in map(json.loads, stdout))


class socketless_port:
    """A loopback port with nothing listening: bound, never listened on, so connects fail."""

    def __enter__(self) -> int:
        import socket

        self._sock = socket.socket()
        self._sock.bind(("127.0.0.1", 0))
        return int(self._sock.getsockname()[1])

    def __exit__(self, *_: object) -> None:
        self._sock.close()
