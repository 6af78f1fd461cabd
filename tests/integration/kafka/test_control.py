"""Back-office commands on payswitch.control reach every replica: three real payswitch
processes, the real broker, simulated gateways."""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import IO

import aiohttp
import orjson
import pytest

from bench.procs import free_port
from proxy.kafka.config import KafkaSettings
from tests.kafka_support import RULES, kafka_settings, publish, read_topic, start_broker
from tests.support import eventually, gateways, running_proxy

pytestmark = pytest.mark.kafka


@pytest.fixture(scope="module", autouse=True)
def broker() -> None:
    start_broker()


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@contextlib.asynccontextmanager
async def replicas(
    n: int, rules_dir: Path, kafka: KafkaSettings, tmp_path: Path
) -> AsyncIterator[list[tuple[str, str]]]:
    """`n` payswitch processes; yields (traffic URL, admin URL) once each has read the
    control topic."""
    procs: list[asyncio.subprocess.Process] = []
    urls: list[tuple[str, str]] = []
    logs: list[IO[bytes]] = []
    try:
        for i in range(n):
            port, admin = free_port(), free_port()
            logs.append((tmp_path / f"replica-{i}.log").open("wb"))
            procs.append(
                await asyncio.create_subprocess_exec(
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
                    "--events",
                    "off",
                    "--access-log",
                    "off",
                    "--no-watch",
                    "--kafka-bootstrap",
                    ",".join(kafka.bootstrap),
                    "--kafka-transactions-topic",
                    kafka.transactions_topic,
                    "--kafka-events-topic",
                    kafka.events_topic,
                    "--kafka-control-topic",
                    kafka.control_topic,
                    "--kafka-spill",
                    str(tmp_path / f"spill-{i}.jsonl"),
                    stdout=asyncio.subprocess.DEVNULL,
                    stderr=logs[-1],
                )
            )
            urls.append((f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin}"))
        async with aiohttp.ClientSession() as session:
            for _, admin_url in urls:
                await _wait_caught_up(session, admin_url, procs, tmp_path)
        yield urls
    finally:
        for p in procs:
            if p.returncode is None:
                p.terminate()
        for p in procs:
            await p.wait()
        for f in logs:
            f.close()


def _logs(tmp_path: Path) -> str:
    return "\n".join(f.read_text() for f in sorted(tmp_path.glob("replica-*.log")))


async def _wait_caught_up(
    session: aiohttp.ClientSession, admin_url: str, procs: list[asyncio.subprocess.Process],
    tmp_path: Path,
) -> None:  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if any(p.returncode is not None for p in procs):
            logs = await asyncio.to_thread(_logs, tmp_path)
            raise AssertionError(f"a replica exited:\n{logs}")
        with contextlib.suppress(aiohttp.ClientError):
            async with session.get(admin_url + "/metrics") as resp:
                if "payswitch_control_caught_up 1.0" in await resp.text():
                    return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{admin_url} never read the control topic")


async def _traffic(url: str, seen: list[tuple[float, str]], stop: asyncio.Event) -> None:
    """A payment every 20 ms; records when it was sent and which gateway took it."""
    async with aiohttp.ClientSession() as session:
        while not stop.is_set():
            sent = time.time()
            async with session.post(url + "/v1/deposits", data=b'{"amount": 1}') as resp:
                assert resp.status == 200, await resp.text()
                seen.append((sent, resp.headers["X-Payswitch-Gateway"]))
            await asyncio.sleep(0.02)


async def test_a_drain_reaches_three_replicas_within_a_second_and_expires_on_time(
    tmp_path: Path,
) -> None:
    kafka = kafka_settings(tmp_path)
    async with gateways("g1", "g2") as g:
        rules_dir = tmp_path / "rules"
        rules_dir.mkdir()
        (rules_dir / "rules.yaml").write_text(RULES.format(g1=g["g1"].url, g2=g["g2"].url))
        async with replicas(3, rules_dir, kafka, tmp_path) as urls:
            seen: list[list[tuple[float, str]]] = [[] for _ in urls]
            stop = asyncio.Event()
            tasks = [
                asyncio.ensure_future(_traffic(u, s, stop))  # noqa: TID251
                for (u, _), s in zip(urls, seen, strict=True)
            ]
            await asyncio.sleep(0.5)
            published = time.time()
            # The command's expiry is whole milliseconds: compare against that instant, not
            # the float it was written from (up to 1 ms later).
            expires_at = _iso(published + 4.0)
            expires = datetime.fromisoformat(expires_at.replace("Z", "+00:00")).timestamp()
            await publish(
                kafka,
                "gateway/g1",
                {
                    "target": "gateway/g1",
                    "action": "drain",
                    "issuer": "ops@example.com",
                    "reason": "provider incident",
                    "expires_at": expires_at,
                },
            )
            await asyncio.sleep(1.5)
            # Invalid (no reason, no expiry) and for the drained target: it must not lift it.
            await publish(kafka, "gateway/g1", {"target": "gateway/g1", "action": "undrain"})
            async with aiohttp.ClientSession() as session:
                async with session.get(urls[0][1] + "/admin/gateways") as resp:
                    overlay = {gw["name"]: gw["overlay"] for gw in await resp.json()}
            await asyncio.sleep(expires + 1.5 - time.time())
            stop.set()
            await asyncio.gather(*tasks)
    assert overlay["g1"] == {
        "target": "gateway/g1",
        "action": "drain",
        "issuer": "ops@example.com",
        "reason": "provider incident",
        "expires_at": expires_at,
    }
    assert overlay["g2"] is None
    # A payment is stamped when sent and routed when it arrives: one sent in the last
    # moment before the expiry may reach its replica after it.
    drained_until = expires - 0.05
    for i, one in enumerate(seen):
        before = [gw for t, gw in one if t < published]
        assert "g1" in before and "g2" in before
        last_g1 = max(t for t, gw in one if gw == "g1" and t < drained_until)
        first_back = min(t for t, gw in one if gw == "g1" and t >= expires)
        print(
            f"\nreplica {i}: last payment to g1 {last_g1 - published:+.3f} s after the drain "
            f"was published; first again {first_back - expires:+.3f} s after it expired"
        )
        assert last_g1 - published < 1.0, f"g1 still used {last_g1 - published:.3f}s after"
        assert not [gw for t, gw in one if published + 1.0 < t < drained_until and gw == "g1"]
        assert first_back - expires < 0.5, f"drain lifted {first_back - expires:.3f}s late"
    events = await read_topic(kafka, kafka.events_topic, expect=9, within=10)
    control = [e for e in events if str(e.value["kind"]).startswith("control.")]
    kinds = sorted(str(e.value["kind"]) for e in control)
    assert kinds == ["control.applied"] * 3 + ["control.expired"] * 3 + ["control.rejected"] * 3
    for e in control:
        assert e.key == "gateway/g1"
    rejected = [e.value["fields"] for e in control if e.value["kind"] == "control.rejected"]
    assert all("reason" in str(f["error"]) for f in rejected)  # type: ignore[index]


async def test_unknown_gateway_and_malformed_json_are_rejected(tmp_path: Path) -> None:
    kafka = kafka_settings(tmp_path)
    async with gateways("g1", "g2") as g:
        rules_dir = tmp_path / "rules"
        rules_dir.mkdir()
        (rules_dir / "rules.yaml").write_text(RULES.format(g1=g["g1"].url, g2=g["g2"].url))
        async with replicas(1, rules_dir, kafka, tmp_path) as [(url, admin)]:
            exp = _iso(time.time() + 60)
            await publish(
                kafka,
                "gateway/nope",
                {"target": "gateway/nope", "action": "drain", "issuer": "a", "reason": "b",
                 "expires_at": exp},
            )  # fmt: skip
            await publish(kafka, "route/deposits", b"{not json")
            events = await read_topic(kafka, kafka.events_topic, expect=3, within=10)
            rejected = {
                e.key: str(e.value["fields"]["error"])  # type: ignore[index]
                for e in events
                if e.value["kind"] == "control.rejected"
            }
            async with aiohttp.ClientSession() as session:
                async with session.get(admin + "/admin/gateways") as resp:
                    assert all(gw["overlay"] is None for gw in await resp.json())

                async def served() -> bool:
                    async with session.post(url + "/v1/deposits", data=b"{}") as r:
                        return r.status == 200

                assert await served()
    assert "no gateway named 'nope'" in rejected["gateway/nope"]
    assert "not JSON" in rejected["route/deposits"]


async def test_a_disabled_route_answers_503_until_enabled(tmp_path: Path) -> None:
    kafka = kafka_settings(tmp_path)
    async with gateways("g1", "g2") as g:
        rules = RULES.format(g1=g["g1"].url, g2=g["g2"].url)
        async with running_proxy(rules, tmp_path, kafka=kafka) as p:
            assert p.rt.kafka is not None and p.rt.kafka.consumer is not None
            await eventually(p.rt.kafka.consumer.caught_up.is_set, within=15)
            command = {"target": "route/deposits", "issuer": "ops", "reason": "INC-1",
                       "expires_at": _iso(time.time() + 60)}  # fmt: skip
            await publish(kafka, "route/deposits", {**command, "action": "disable"})
            await eventually(lambda: bool(p.rt.disabled_routes), within=2)
            async with p.session.get(p.admin_url + "/admin/control") as resp:
                shown = await resp.json()
            assert shown["caught_up"] is True
            assert shown["commands"] == [{**command, "action": "disable"}]
            status, headers, body = await p.post()
            assert status == 503
            assert headers["Content-Type"] == "application/problem+json"
            problem = orjson.loads(body)
            assert problem["route"] == "deposits"
            assert "disabled until" in problem["detail"] and "ops: INC-1" in problem["detail"]
            assert not g["g1"].requests() and not g["g2"].requests()
            await publish(kafka, "route/deposits", {**command, "action": "enable"})
            await eventually(lambda: not p.rt.disabled_routes, within=2)
            status, _, _ = await p.post()
            assert status == 200
            assert p.events.kinds("control.") == ["control.applied", "control.applied"]
