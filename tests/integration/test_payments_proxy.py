"""Payment safety end to end: idempotency keys, abandoned attempts, transaction events."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest
import redis.asyncio as aioredis

from proxy.aio import spawn
from proxy.events import Severity
from tests.support import Proxy, eventually, gateways, running_proxy

REDIS_URL = "redis://127.0.0.1:6379/0"


def rules(
    urls: dict[str, str],
    providers: dict[str, str],
    *,
    per_try: str = "300ms",
    total: str = "3s",
    policy: str = "same-provider",
    idempotency: str = "{header: Idempotency-Key}",
    attempts: int = 3,
) -> str:
    gws = "\n".join(
        f"  {n}: {{url: '{u}', region: eu, provider: {providers[n]}}}" for n, u in urls.items()
    )
    return f"""
gateways:
{gws}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [{", ".join(urls)}]
    timeouts: {{per_try: {per_try}, total: {total}}}
    retry: {{attempts: {attempts}, on: [connect-failure, timeout, reset, 503], after_ambiguous: {policy}}}
    idempotency: {idempotency}
"""


def key() -> dict[str, str]:
    return {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}


def terminal(p: Proxy) -> list[str]:
    return [k for k in p.events.kinds("transaction.") if k != "transaction.pending"]


async def test_concurrent_duplicates_dispatch_once_and_get_409(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        g["g1"].set(delay=0.3)
        async with running_proxy(rules({"g1": g["g1"].url}, {"g1": "stripe"}), tmp_path) as p:
            hdrs = key()
            results = await asyncio.gather(*(p.post(headers=hdrs) for _ in range(10)))
            statuses = sorted(r[0] for r in results)
            assert statuses == [200] + [409] * 9
            assert len(g["g1"].requests()) == 1
            conflict = next(r for r in results if r[0] == 409)
            assert conflict[1]["Content-Type"].startswith("application/problem+json")
            assert int(conflict[1]["Retry-After"]) >= 1


async def test_replay_is_byte_identical_and_marked(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}, {"g1": "stripe"}), tmp_path) as p:
            hdrs = key()
            s1, h1, b1 = await p.post(headers=hdrs)
            s2, h2, b2 = await p.post(headers=hdrs)
            assert (s1, s2) == (200, 200)
            assert b1 == b2
            assert "Idempotent-Replayed" not in h1
            assert h2["Idempotent-Replayed"] == "true"
            assert (
                h2["X-Payswitch-Transaction-Id"]
                == h1["X-Payswitch-Transaction-Id"]
                == hdrs["Idempotency-Key"]
            )
            assert h2["X-Payswitch-Gateway"] == h1["X-Payswitch-Gateway"]
            assert len(g["g1"].requests()) == 1


async def test_changed_payload_with_same_key_gets_422(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}, {"g1": "stripe"}), tmp_path) as p:
            hdrs = key()
            assert (await p.post(headers=hdrs))[0] == 200
            status, _, body = await p.post(headers=hdrs, data=b'{"amount": 999}')
            assert status == 422
            assert orjson.loads(body)["status"] == 422
            assert len(g["g1"].requests()) == 1


@pytest.mark.parametrize(
    ("headers", "words"),
    [
        ({}, "requires an Idempotency-Key"),
        ({"Idempotency-Key": "has space"}, "invalid idempotency key"),
    ],
    ids=["missing", "invalid"],
)
async def test_required_key_missing_or_invalid_gets_400(
    tmp_path: Path, headers: dict[str, str], words: str
) -> None:
    async with gateways("g1") as g:
        text = rules(
            {"g1": g["g1"].url},
            {"g1": "stripe"},
            idempotency="{header: Idempotency-Key, required: true}",
        )
        async with running_proxy(text, tmp_path) as p:
            status, _, body = await p.post(headers=headers)
            assert status == 400
            assert words in orjson.loads(body)["detail"]
            assert not g["g1"].requests()


async def test_two_instances_sharing_redis_dispatch_a_key_once(tmp_path: Path) -> None:
    prefix = f"payswitch-test-{uuid.uuid4().hex}:"
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert await client.ping(), "Redis must answer on 127.0.0.1:6379 (see .ci/run)"
        async with gateways("g1") as g:
            g["g1"].set(delay=0.2)
            text = rules({"g1": g["g1"].url}, {"g1": "stripe"})
            opts = {"idempotency_store": REDIS_URL, "idempotency_prefix": prefix}
            (tmp_path / "a").mkdir()
            (tmp_path / "b").mkdir()
            async with (
                running_proxy(text, tmp_path / "a", **opts) as a,
                running_proxy(text, tmp_path / "b", **opts) as b,
            ):
                hdrs = key()
                results = await asyncio.gather(*(x.post(headers=hdrs) for x in (a, b, a, b, a, b)))
                assert sorted(r[0] for r in results) == [200, 409, 409, 409, 409, 409]
                assert len(g["g1"].requests()) == 1
                sa, ha, ba = await a.post(headers=hdrs)
                sb, hb, bb = await b.post(headers=hdrs)
                assert (sa, sb) == (200, 200) and ba == bb
                assert ha["Idempotent-Replayed"] == hb["Idempotent-Replayed"] == "true"
                txn = hdrs["Idempotency-Key"]
                async with b.session.get(f"{b.admin_url}/admin/transactions/{txn}") as resp:
                    assert resp.status == 200
                    record = await resp.json()
                assert record["state"] == "SUCCESS"
                assert len(g["g1"].requests()) == 1
    finally:
        keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


async def test_same_provider_never_retries_on_another_provider_after_timeout(
    tmp_path: Path,
) -> None:
    async with gateways(
        "s1", "a1", "s2", providers={"s1": "stripe", "a1": "adyen", "s2": "stripe"}
    ) as g:
        g["s1"].set(mode="hang")
        text = rules(
            {n: gw.url for n, gw in g.items()}, {"s1": "stripe", "a1": "adyen", "s2": "stripe"}
        )
        async with running_proxy(text, tmp_path) as p:
            # SWRR over equal weights starts with s1.
            status, headers, _ = await p.post(headers=key())
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "s2"
            assert not g["a1"].requests()
            # With no other stripe gateway left, nothing is resent to adyen.
            await g["s2"].down()
            g["s1"].set(mode="hang")
            for _ in range(3):
                status, headers, body = await p.post(headers=key())
                problem = orjson.loads(body)
                if status == 504:
                    assert problem["title"] == "Payment outcome unknown"
                    assert {t["gateway"] for t in problem["tried"]} <= {"s1", "s2", "-"}
                else:
                    assert headers["X-Payswitch-Gateway"] == "a1"  # a1 was picked first: fine
            assert all(r.headers.get("X-Payswitch-Attempt-Id") for r in g["a1"].requests())
            attempts_on_a1 = {r.headers["X-Payswitch-Transaction-Id"] for r in g["a1"].requests()}
            attempts_on_s1 = {r.headers["X-Payswitch-Transaction-Id"] for r in g["s1"].requests()}
            assert not attempts_on_a1 & attempts_on_s1, (
                "a payment that timed out on stripe went to adyen"
            )


async def test_late_answer_of_abandoned_attempt_is_returned_when_it_comes_first(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2", providers={"g1": "stripe", "g2": "stripe"}) as g:
        g["g1"].set(delay=0.45)
        g["g2"].set(delay=1.0)
        text = rules({n: gw.url for n, gw in g.items()}, {"g1": "stripe", "g2": "stripe"})
        async with running_proxy(text, tmp_path) as p:
            status, headers, body = await p.post(headers=key())
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "g1"
            assert headers["X-Payswitch-Attempts"] == "2"
            assert orjson.loads(body)["gateway"] == "g1"
            # g2 answers later too: both succeeded, the provider deduped the key, and the
            # proxy reports the pair so it can be checked.
            await eventually(lambda: bool(p.events.of("payment.duplicate_suspected")), within=3)
            event = p.events.of("payment.duplicate_suspected")[0]
            assert event.fields["reason"] == "both_succeeded_deduped"
            assert event.severity < Severity.ERROR, "a provider-deduped pair must not page"
            assert g["g1"].ledger.charged_twice() == 0


async def test_both_gateways_succeed_is_reported_as_duplicate_suspected(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        g["g1"].set(delay=0.6)
        g["g2"].set(delay=0.05)
        text = rules(
            {n: gw.url for n, gw in g.items()},
            {"g1": "stripe", "g2": "adyen"},
            policy="any-gateway",
        )
        async with running_proxy(text, tmp_path) as p:
            status, headers, _ = await p.post(headers=key())
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "g2"
            await eventually(lambda: bool(p.events.of("payment.duplicate_suspected")), within=3)
            event = p.events.of("payment.duplicate_suspected")[0]
            assert event.fields["reason"] == "both_succeeded"
            assert event.severity is Severity.CRITICAL
            gws = [a["gateway"] for a in event.fields["attempts"]]  # type: ignore[attr-defined]
            assert gws == ["g2", "g1"]
            assert g["g1"].ledger.charged_twice() == 1
            txn = headers["X-Payswitch-Transaction-Id"]
            async with p.session.get(f"{p.admin_url}/admin/transactions/{txn}") as resp:
                record = await resp.json()
            assert record["state"] == "SUCCESS"
            assert record["gateway"] == "g2"
            assert [a["gateway"] for a in record["attempts"]] == ["g1", "g2"]
            assert record["late_results"][0]["kind"] == "duplicate_suspected"


async def test_late_success_after_the_client_was_told_unknown(tmp_path: Path) -> None:
    async with gateways("g1", "g2", providers={"g1": "stripe", "g2": "adyen"}) as g:
        g["g1"].set(delay=0.9)
        text = rules(
            {"g1": g["g1"].url, "g2": g["g2"].url},
            {"g1": "stripe", "g2": "adyen"},
            per_try="200ms",
            total="500ms",
            policy="never",
        )
        async with running_proxy(text, tmp_path) as p:
            hdrs = key()
            status, _, body = await p.post(headers=hdrs)
            assert status == 504
            assert orjson.loads(body)["title"] == "Payment outcome unknown"
            assert terminal(p) == ["transaction.unknown"]
            await eventually(lambda: bool(p.events.of("payment.late_success")), within=3)
            assert p.events.of("payment.late_success")[0].fields["gateway"] == "g1"
            # The client retries the unresolved key: it goes back to g1, which can dedupe it.
            g["g1"].set(delay=0.0)
            status, headers, body = await p.post(headers=hdrs)
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "g1"
            assert orjson.loads(body)["replayed"] is True
            assert g["g1"].ledger.charged_twice() == 0
            assert not g["g2"].requests()


async def test_every_request_has_exactly_one_terminal_transaction_event(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        text = rules(
            {n: gw.url for n, gw in g.items()},
            {"g1": "stripe", "g2": "stripe"},
            per_try="150ms",
            total="1s",
        )
        async with running_proxy(text, tmp_path) as p:
            outcomes = []
            for mode in ("ok", "hang", "status", "reset", "ok", "throttle"):
                g["g1"].set(mode=mode)
                outcomes.append((await p.post(headers=key()))[0])
            await g["g1"].down()
            await g["g2"].down()
            outcomes.append((await p.post(headers=key()))[0])
            ids = [
                e.fields["transaction_id"]
                for e in p.events.events
                if e.kind.startswith("transaction.") and e.kind != "transaction.pending"
            ]
            pending = [e.fields["transaction_id"] for e in p.events.of("transaction.pending")]
            assert len(ids) == len(set(ids)) == len(outcomes) == len(pending)
            assert set(ids) == set(pending)


async def test_transaction_is_visible_as_pending_while_in_flight(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        g["g1"].set(delay=0.5)
        async with running_proxy(rules({"g1": g["g1"].url}, {"g1": "stripe"}), tmp_path) as p:
            hdrs = key()
            sending = spawn(p.post(headers=hdrs), name="test-pending-payment")
            await eventually(lambda: bool(g["g1"].requests()))
            url = f"{p.admin_url}/admin/transactions/{hdrs['Idempotency-Key']}"
            async with p.session.get(url) as resp:
                pending = await resp.json()
            assert pending["state"] == "PENDING"
            assert [a["gateway"] for a in pending["attempts"]] == ["g1"]
            assert (await sending)[0] == 200
            async with p.session.get(url) as resp:
                assert (await resp.json())["state"] == "SUCCESS"
            async with p.session.get(f"{p.admin_url}/admin/transactions/nope") as resp:
                assert resp.status == 404
