"""`payswitch run --workers 2` as real processes on real sockets: both workers serve,
SIGTERM drains them with no client error, SIGHUP reloads both, a killed worker comes back,
the supervisor's death takes the workers with it, and what must not start does not."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import free_port, free_ports
from tests.support import eventually, gateways

REPO = Path(__file__).resolve().parents[2]
GRACE = 1.0

RULES = """\
gateways:
  g1: {{url: '{url}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [g1]
{extra}"""
KEYED = "    idempotency: {header: Idempotency-Key}\n"
REFUNDS = """\
  - name: refunds
    match: {path_prefix: /v1/refunds, methods: [POST]}
    region: {default: eu}
    gateways: [g1]
"""


@dataclass
class Run:
    proc: subprocess.Popen[bytes]
    log: Path
    listen: int
    admin: int
    rules: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def admin_url(self, worker: int, path: str) -> str:
        return f"http://127.0.0.1:{self.admin + worker}{path}"


def start(tmp_path: Path, rules_text: str, *extra: str, env: dict[str, str] | None = None) -> Run:
    rules = tmp_path / "rules"
    rules.mkdir(exist_ok=True)
    (rules / "rules.yaml").write_text(rules_text)
    listen, admin = free_port(), free_ports(2)
    log = tmp_path / "payswitch.log"
    args = ["run", "--workers", "2", "--rules", str(rules), "--listen", f"127.0.0.1:{listen}"]
    args += ["--admin", f"127.0.0.1:{admin}", "--events", "off", "--access-log", "off", *extra]
    full_env = {
        **os.environ,
        "PAYSWITCH_SHUTDOWN_GRACE": str(GRACE),
        "PAYSWITCH_SHUTDOWN_DEADLINE": "3",
        **(env or {}),
    }
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "proxy", *args],
            cwd=REPO,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    return Run(proc, log, listen, admin, rules)


async def get(http: aiohttp.ClientSession, url: str) -> tuple[int, str] | None:
    try:
        async with http.get(url) as resp:
            return resp.status, await resp.text()
    except aiohttp.ClientError:
        return None


async def wait_ready(http: aiohttp.ClientSession, run: Run, within: float = 20.0) -> None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        assert run.proc.poll() is None, run.output()
        got = [await get(http, run.admin_url(w, "/readyz")) for w in (0, 1)]
        if all(g is not None and g[0] == 200 for g in got):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"workers never ready:\n{run.output()}")


async def worker_pid(http: aiohttp.ClientSession, run: Run, worker: int) -> int:
    got = await get(http, run.admin_url(worker, "/metrics"))
    assert got is not None and got[0] == 200, run.output()
    for family in text_string_to_metric_families(got[1]):
        if family.name == "payswitch_worker_info":
            (sample,) = family.samples
            assert sample.labels["worker"] == str(worker)
            return int(sample.labels["pid"])
    raise AssertionError("no payswitch_worker_info")


async def requests_served(http: aiohttp.ClientSession, run: Run, worker: int) -> float:
    got = await get(http, run.admin_url(worker, "/metrics"))
    assert got is not None and got[0] == 200
    return sum(
        s.value
        for f in text_string_to_metric_families(got[1])
        if f.name == "payswitch_requests"
        for s in f.samples
        if s.name == "payswitch_requests_total"
    )


def gone(pid: int) -> bool:
    """No such process, or a zombie nobody has reaped yet (it no longer runs)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def pay(
    http: aiohttp.ClientSession, run: Run, headers: dict[str, str] | None = None
) -> aiohttp.ClientResponse:
    async with http.post(
        f"http://127.0.0.1:{run.listen}/v1/deposits", json={"amount": 5}, headers=headers
    ) as resp:
        await resp.read()
        return resp


@asynccontextmanager
async def workers(tmp_path: Path, *extra: str, rules_extra: str = "") -> AsyncIterator[Run]:
    """Two workers in front of one fake gateway, ready; stopped and reaped on exit."""
    async with gateways("g1") as g:
        run = start(tmp_path, RULES.format(url=g["g1"].url, extra=rules_extra), *extra)
        try:
            yield run
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


def fresh_connections() -> aiohttp.ClientSession:
    """A client that opens a new connection per request, so the kernel spreads them."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(force_close=True),
        timeout=aiohttp.ClientTimeout(total=10),
    )


async def test_both_workers_serve_traffic(tmp_path: Path) -> None:
    async with workers(tmp_path) as run, fresh_connections() as http:
        await wait_ready(http, run)
        assert await worker_pid(http, run, 0) != await worker_pid(http, run, 1)
        answers = [await pay(http, run) for _ in range(40)]
        assert [a.status for a in answers] == [200] * 40
        # Workers are forked from one process: each must still make its own ids.
        txns = {a.headers["X-Payswitch-Transaction-Id"] for a in answers}
        assert len(txns) == 40
        served = [await requests_served(http, run, w) for w in (0, 1)]
        # 40 connections hashed over two sockets: all on one has odds of 2 ** -39.
        assert sum(served) == 40 and min(served) > 0, served


async def test_sigterm_drains_every_worker_with_no_client_error(tmp_path: Path) -> None:
    async with workers(tmp_path) as run, fresh_connections() as http:
        await wait_ready(http, run)
        pids = [await worker_pid(http, run, w) for w in (0, 1)]

        async def client(n: int) -> list[int]:
            return [(await pay(http, run)).status for _ in range(n)]

        load = asyncio.gather(*(client(15) for _ in range(4)))
        await asyncio.sleep(0.1)
        run.proc.send_signal(signal.SIGTERM)
        # Readiness fails at once on both while traffic is still served for the grace.
        end = time.monotonic() + GRACE / 2
        while time.monotonic() < end:
            got = [await get(http, run.admin_url(w, "/readyz")) for w in (0, 1)]
            if all(g is not None and g[0] == 503 for g in got):
                break
            await asyncio.sleep(0.02)
        else:
            raise AssertionError(f"readiness did not fail on both: {got}\n{run.output()}")
        statuses = [s for batch in await load for s in batch]
        assert statuses == [200] * 60, run.output()
        assert await asyncio.to_thread(run.proc.wait, GRACE + 10) == 0, run.output()
        assert all(gone(pid) for pid in pids), run.output()


RELOADS = {"SIGHUP to the supervisor": None, "POST /admin/reload to worker 1": 1}


@pytest.mark.parametrize("admin_worker", RELOADS.values(), ids=RELOADS)
async def test_a_reload_reaches_every_worker(tmp_path: Path, admin_worker: int | None) -> None:
    async with workers(tmp_path, "--no-watch") as run, fresh_connections() as http:
        await wait_ready(http, run)
        rules = run.rules / "rules.yaml"
        rules.write_text(rules.read_text() + REFUNDS)
        if admin_worker is None:
            run.proc.send_signal(signal.SIGHUP)
        else:
            async with http.post(run.admin_url(admin_worker, "/admin/reload")) as resp:
                assert resp.status == 200, await resp.text()
        end = time.monotonic() + 10
        generations: list[object] = []
        while time.monotonic() < end:
            generations = []
            for w in (0, 1):
                got = await get(http, run.admin_url(w, "/admin/config"))
                generations.append(None if got is None else json.loads(got[1])["generation"])
            if generations == [2, 2]:
                break
            await asyncio.sleep(0.05)
        assert generations == [2, 2], run.output()


async def test_a_killed_worker_is_logged_and_restarted(tmp_path: Path) -> None:
    async with workers(tmp_path, "--events", "stdout") as run, fresh_connections() as http:
        await wait_ready(http, run)
        old = await worker_pid(http, run, 1)
        os.kill(old, signal.SIGKILL)
        # While it is down, the other worker (the kubelet's) is not ready.
        end = time.monotonic() + 5
        seen_down = False
        while time.monotonic() < end and not seen_down:
            got = await get(http, run.admin_url(0, "/readyz"))
            seen_down = got is not None and got[0] == 503 and "worker down" in got[1]
            await asyncio.sleep(0.01)
        assert seen_down, run.output()
        await wait_ready(http, run)
        new = await worker_pid(http, run, 1)
        assert new != old and gone(old)
        log = run.output()
        assert '"msg":"worker 1 died unexpectedly; restarting it in 0.25s"' in log, log
        assert '"signal":"SIGKILL"' in log
        await eventually(lambda: '"kind":"worker.restarted"' in run.output())
        (event,) = [
            json.loads(line)
            for line in run.output().splitlines()
            if '"kind":"worker.restarted"' in line
        ]
        assert event["severity"] == "error"
        assert event["fields"] == {
            "worker": 1,
            "pid": new,
            "previous_pid": old,
            "exit": "signal SIGKILL",
            "ran_s": event["fields"]["ran_s"],
        }
        assert (await pay(http, run)).status == 200


async def test_supervisor_death_takes_the_workers_with_it(tmp_path: Path) -> None:
    async with workers(tmp_path) as run, fresh_connections() as http:
        await wait_ready(http, run)
        pids = [await worker_pid(http, run, w) for w in (0, 1)]
        run.proc.kill()
        run.proc.wait()
        # They got SIGTERM from the kernel, so they drain: grace, then their deadline.
        await eventually(lambda: all(gone(p) for p in pids), within=GRACE + 10)


async def test_workers_that_keep_failing_at_start_stop_the_supervisor(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        async with gateways("g1") as g:
            run = start(
                tmp_path, RULES.format(url=g["g1"].url, extra=""), "--listen", f"127.0.0.1:{port}"
            )
            code = await asyncio.to_thread(run.proc.wait, 30)
    assert code == 1, run.output()
    log = run.output()
    assert "failed to start 5 times in a row" in log, log
    assert log.count("died unexpectedly") >= 4, log


REFUSED = {
    "memory store with keyed routes": (
        RULES.format(url="http://127.0.0.1:9", extra=KEYED),
        2,
        "--idempotency-store redis://HOST:PORT/DB",
    ),
    "invalid rules": (
        RULES.format(url="http://127.0.0.1:9", extra="    retry: {attempts: lots}\n"),
        1,
        "the rules are not valid; nothing was started",
    ),
}


@pytest.mark.parametrize(("rules", "code", "message"), REFUSED.values(), ids=REFUSED)
def test_refused_before_any_worker_starts(
    tmp_path: Path, rules: str, code: int, message: str
) -> None:
    run = start(tmp_path, rules)
    assert run.proc.wait(timeout=20) == code, run.output()
    log = run.output()
    assert message in log, log
    assert "worker 0 started" not in log
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", run.listen)) != 0  # nobody listens


async def test_keyed_payments_with_redis_are_replayed_across_workers(tmp_path: Path) -> None:
    prefix = f"payswitch-test-{uuid.uuid4().hex[:8]}:"
    async with gateways("g1") as g:
        run = start(
            tmp_path,
            RULES.format(url=g["g1"].url, extra=KEYED),
            "--idempotency-store",
            "redis://127.0.0.1:6379/0",
            env={"PAYSWITCH_IDEMPOTENCY_PREFIX": prefix},
        )
        try:
            async with fresh_connections() as http:
                await wait_ready(http, run)
                answers = [await pay(http, run, {"Idempotency-Key": "k-1"}) for _ in range(20)]
                assert [a.status for a in answers] == [200] * 20, run.output()
                replayed = [a.headers.get("Idempotent-Replayed") for a in answers]
                assert replayed == [None] + ["true"] * 19
                served = [await requests_served(http, run, w) for w in (0, 1)]
                assert min(served) > 0, served  # the retries did reach both workers
            assert len(g["g1"].requests()) == 1
        finally:
            if run.proc.poll() is None:
                run.proc.kill()
                run.proc.wait()


async def test_a_reload_adding_keys_to_a_memory_store_is_refused(tmp_path: Path) -> None:
    """Started unkeyed on the memory store, a reload making a route keyed would let a
    retry reach a worker that never saw the key: every worker refuses it and keeps serving."""
    async with workers(tmp_path, "--no-watch") as run, fresh_connections() as http:
        await wait_ready(http, run)
        rules = run.rules / "rules.yaml"
        rules.write_text(rules.read_text() + KEYED)
        run.proc.send_signal(signal.SIGHUP)
        configs: list[dict[str, object]] = []
        end = time.monotonic() + 10
        while time.monotonic() < end:
            configs = []
            for w in (0, 1):
                got = await get(http, run.admin_url(w, "/admin/config"))
                assert got is not None
                configs.append(json.loads(got[1]))
            if all(c.get("last_error") for c in configs):
                break
            await asyncio.sleep(0.05)
        for config in configs:
            assert config["generation"] == 1
            assert "--idempotency-store redis://" in json.dumps(config["last_error"]), config
        assert (await pay(http, run, {"Idempotency-Key": "k"})).status == 200
