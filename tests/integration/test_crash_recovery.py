"""A payswitch that dies holding a key: the next one sends the key back to the gateway
that saw it, because the gateway was recorded in the shared store before it was sent."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

from bench.procs import free_port
from proxy.aio import spawn
from tests.support import eventually, gateways

REDIS_URL = "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parents[2]


def rules(urls: dict[str, str]) -> str:
    providers = {"a1": "adyen", "s1": "stripe"}
    gws = "\n".join(
        f"  {n}: {{url: '{u}', region: eu, provider: {providers[n]}}}" for n, u in urls.items()
    )
    return textwrap.dedent(f"""
gateways:
{gws}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [a1, s1]
    timeouts: {{per_try: 2s, total: 2s}}
    retry: {{attempts: 2, on: [connect-failure, timeout], after_ambiguous: same-provider}}
    idempotency: {{header: Idempotency-Key}}
""")


@contextlib.asynccontextmanager
async def payswitch(rules_dir: Path, port: int, admin: int, prefix: str) -> AsyncIterator[int]:
    """`python -m proxy run` as a real process on the Redis store; yields its pid."""
    env = {**os.environ, "PAYSWITCH_IDEMPOTENCY_PREFIX": prefix}
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--rules",
        str(rules_dir),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--idempotency-store",
        REDIS_URL,
        "--events",
        "off",
        "--access-log",
        "off",
        "--no-watch",
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(200):
                if proc.returncode is not None:
                    err = (await proc.stderr.read()).decode() if proc.stderr else ""
                    raise AssertionError(f"payswitch exited with {proc.returncode}: {err}")
                with contextlib.suppress(aiohttp.ClientError):
                    async with http.get(f"http://127.0.0.1:{admin}/readyz") as r:
                        if r.status == 200:
                            break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError("payswitch did not become ready")
        yield proc.pid
    finally:
        if proc.returncode is None:
            proc.kill()
        await asyncio.wait_for(proc.wait(), 10)


async def pay(http: aiohttp.ClientSession, url: str, body: bytes, key: dict[str, str]) -> None:
    """A payment whose answer is lost when payswitch dies."""
    with contextlib.suppress(aiohttp.ClientError):
        async with http.post(url, data=body, headers=key) as resp:
            await resp.read()


async def test_key_held_by_a_killed_payswitch_goes_back_to_the_same_gateway(
    tmp_path: Path,
) -> None:
    prefix = f"test-crash-{uuid.uuid4().hex[:8]}:"
    rules_dir = tmp_path / "rules"
    rules_dir.mkdir()
    port, admin = free_port(), free_port()
    key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
    body = b'{"amount": 100, "currency": "EUR"}'
    url = f"http://127.0.0.1:{port}/v1/deposits"
    store = aioredis.from_url(REDIS_URL)
    try:
        async with gateways("a1", "s1", providers={"a1": "adyen", "s1": "stripe"}) as g:
            (rules_dir / "rules.yaml").write_text(rules({n: gw.url for n, gw in g.items()}))
            # a1 refuses (provably unsent) so the payment lands on s1, which hangs.
            await g["a1"].down()
            g["s1"].set(mode="hang")
            async with aiohttp.ClientSession() as http:
                async with payswitch(rules_dir, port, admin, prefix) as pid:
                    pending = spawn(pay(http, url, body, key), name="payment-in-flight")
                    await eventually(lambda: bool(g["s1"].requests()), within=5.0)
                    os.kill(pid, signal.SIGKILL)
                    await pending
                # The next payswitch starts with a1 healthy and first in line.
                await g["a1"].up()
                g["s1"].set(mode="ok")
                async with payswitch(rules_dir, port, admin, prefix):
                    statuses = []
                    for _ in range(200):
                        async with http.post(url, data=body, headers=key) as resp:
                            statuses.append(resp.status)
                            gateway = resp.headers.get("X-Payswitch-Gateway")
                            if resp.status != 409:
                                break
                        await asyncio.sleep(0.1)
                    assert statuses[-1] == 200, statuses
                    assert set(statuses[:-1]) <= {409}
                    assert gateway == "s1"
            assert not g["a1"].requests(), "a key whose outcome was lost went to another provider"
            keys = {r.headers.get("Idempotency-Key") for r in g["s1"].requests()}
            assert len(g["s1"].requests()) == 2 and len(keys) == 1
    finally:
        async for k in store.scan_iter(match=f"{prefix}*"):
            await store.delete(k)
        await store.aclose()
