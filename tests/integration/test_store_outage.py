"""The idempotency store going away and coming back, with a real Redis on its own port.

Keyed payments are refused with 503 and Retry-After (never 500, never sent unprotected),
the outage is said once (one log line, one `store.down` event, a gauge), readiness reports
it, and once Redis answers again the store is noticed up without waiting for traffic. A
route with `on_store_down: local` keeps taking payments on keys held in process, loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import orjson
import pytest

from bench.procs import free_port
from tests.support import eventually, gateways, running_proxy


@contextlib.contextmanager
def redis_on(port: int) -> Iterator[subprocess.Popen[bytes]]:
    exe = shutil.which("redis-server")
    assert exe, "redis-server must be installed (make test installs it)"
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
                break
            assert time.monotonic() < deadline, f"redis-server did not start on {port}"
            time.sleep(0.05)
        yield proc
    finally:
        proc.terminate()
        proc.wait(10)


@contextlib.asynccontextmanager
async def black_hole() -> AsyncIterator[int]:
    """A server that accepts connections and never answers: a Redis that hangs."""
    held: list[asyncio.StreamWriter] = []

    async def swallow(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        for w in held:
            w.close()
        server.close()
        await server.wait_closed()


def rules(url: str, on_store_down: str = "refuse") -> str:
    return f"""
gateways:
  g1: {{url: '{url}', region: eu, provider: stripe}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [g1]
    timeouts: {{per_try: 1s, total: 3s}}
    idempotency: {{header: Idempotency-Key, on_store_down: {on_store_down}}}
"""


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}


async def test_redis_down_refuses_keyed_payments_once_said_then_recovers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    store = f"redis://127.0.0.1:{port}/0"
    async with gateways("g1") as g:
        async with running_proxy(rules(g["g1"].url), tmp_path, idempotency_store=store) as p:
            with caplog.at_level(logging.WARNING):
                answers = [await p.post(headers=key()) for _ in range(20)]
            assert {a[0] for a in answers} == {503}
            status, headers, body = answers[0]
            assert int(headers["Retry-After"]) >= 1
            problem = orjson.loads(body)
            assert problem["type"].endswith("/idempotency-store-unavailable")
            assert "not sent" in problem["detail"]
            assert not g["g1"].requests(), "nothing may be sent without its key claimed"
            assert sum("idempotency store down" in r.message for r in caplog.records) == 1
            traced = [r.message for r in caplog.records if r.exc_info]
            assert len(traced) == 1, "one traceback per outage, not one per request"
            assert "idempotency store down" in traced[0]
            assert p.events.kinds("store.") == ["store.down"]
            async with p.session.get(p.admin_url + "/readyz") as resp:
                assert resp.status == 200
                assert (await resp.json())["idempotency_store"] == "down"
            async with p.session.get(p.admin_url + "/metrics") as resp:
                text = await resp.text()
            assert "payswitch_idempotency_store_up 0.0" in text
            assert 'payswitch_idempotency_total{result="store_down",route="deposits"} 20.0' in text

            with redis_on(port):
                # Noticed by the probe, before any payment tries the store again.
                await eventually(lambda: p.rt.payments.guard.up, within=5)
                assert p.events.kinds("store.") == ["store.down", "store.up"]
                status, _, _ = await p.post(headers=key())
                assert status == 200
                assert len(g["g1"].requests()) == 1


async def test_a_redis_that_hangs_fails_the_claim_quickly(tmp_path: Path) -> None:
    async with black_hole() as port, gateways("g1") as g:
        store = f"redis://127.0.0.1:{port}/0"
        async with running_proxy(rules(g["g1"].url), tmp_path, idempotency_store=store) as p:
            started = time.monotonic()
            status, _, _ = await p.post(headers=key())
            assert status == 503
            assert time.monotonic() - started < 2.5
            assert not g["g1"].requests()


async def test_local_fallback_keeps_taking_payments_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = f"redis://127.0.0.1:{free_port()}/0"
    async with gateways("g1") as g:
        text = rules(g["g1"].url, on_store_down="local")
        async with running_proxy(text, tmp_path, idempotency_store=store) as p:
            hdrs = key()
            with caplog.at_level(logging.WARNING):
                first = await p.post(headers=hdrs)
                again = await p.post(headers=hdrs)
            assert first[0] == again[0] == 200
            assert again[1]["Idempotent-Replayed"] == "true"  # deduped in process
            assert len(g["g1"].requests()) == 1
            assert "key held in this process only" in caplog.text
            async with p.session.get(p.admin_url + "/metrics") as resp:
                text = await resp.text()
            assert 'result="local_fallback"' in text


async def test_a_full_memory_store_in_refuse_mode_answers_503_and_keeps_every_key(
    tmp_path: Path,
) -> None:
    async with gateways("g1") as g:
        async with running_proxy(
            rules(g["g1"].url),
            tmp_path,
            idempotency_memory_bytes=64 * 1024,
            idempotency_when_full="refuse",
        ) as p:
            keys = [key() for _ in range(200)]
            statuses = [(await p.post(headers=k))[0] for k in keys]
            taken = statuses.count(200)
            assert 50 < taken < 200
            assert statuses[:taken] == [200] * taken
            assert set(statuses[taken:]) == {503}
            status, headers, body = await p.post(headers=keys[-1])
            assert status == 503
            assert int(headers["Retry-After"]) >= 1
            assert "full" in orjson.loads(body)["detail"]
            # Every key taken is still replayed: nothing was evicted to make room.
            for k in keys[:taken]:
                again = await p.post(headers=k)
                assert again[1].get("Idempotent-Replayed") == "true"
            assert len(g["g1"].requests()) == taken


async def test_a_store_that_hangs_delays_no_answer_once_known_down(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with black_hole() as port, gateways("g1") as g:
        store = f"redis://127.0.0.1:{port}/0"
        text = rules(g["g1"].url, on_store_down="local")
        async with running_proxy(text, tmp_path, idempotency_store=store) as p:
            with caplog.at_level(logging.WARNING):
                status, _, _ = await p.post(headers=key())  # the claim finds the store down
                assert status == 200
                assert not p.rt.payments.guard.up
                started = time.monotonic()
                answers = [await p.post() for _ in range(5)]  # no key: no claim
                answers += [await p.post(headers=key()) for _ in range(5)]
                elapsed = time.monotonic() - started
            assert [a[0] for a in answers] == [200] * 10
            # Each would wait for the store's 1 s timeout: claiming its key, writing its
            # transaction record.
            assert elapsed < 1.0, f"10 payments took {elapsed:.2f}s"
            traced = [r.message for r in caplog.records if r.exc_info]
            assert len(traced) == 1, "one traceback per outage, not one per payment"
            assert sum("key held in this process only" in r.message for r in caplog.records) == 1
            assert p.events.kinds("store.") == ["store.down"]
            errors = p.rt.registry.get_sample_value
            assert errors("payswitch_idempotency_store_errors_total", {"op": "record"}) == 11
            assert errors("payswitch_idempotency_store_errors_total", {"op": "claim"}) == 6


async def test_a_key_taken_locally_during_an_outage_stays_local_after_it(tmp_path: Path) -> None:
    # Redis never saw the key: a retry sent to Redis once it is back would charge twice.
    port = free_port()
    store = f"redis://127.0.0.1:{port}/0"
    async with gateways("g1") as g:
        text = rules(g["g1"].url, on_store_down="local")
        async with running_proxy(text, tmp_path, idempotency_store=store) as p:
            hdrs = key()
            status, _, _ = await p.post(headers=hdrs)
            assert status == 200
            assert not p.rt.payments.guard.up
            with redis_on(port):
                await eventually(lambda: p.rt.payments.guard.up, within=5)
                status, headers, _ = await p.post(headers=hdrs)
                assert status == 200
                assert headers["Idempotent-Replayed"] == "true"
                assert len(g["g1"].requests()) == 1
                status, headers, _ = await p.post(headers=key())  # a new key: Redis again
                assert status == 200
                assert "Idempotent-Replayed" not in headers
                assert len(g["g1"].requests()) == 2
                assert p.rt.payments.guard.up
