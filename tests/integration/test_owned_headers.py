"""Headers payswitch owns are never the client's, end to end through a real gateway.

A client cannot strip the idempotency key with `Connection`, cannot choose a transaction id,
cannot make two clients' keys collide at the provider on a scoped route, and cannot make
the gateway believe forwarding headers it wrote itself unless it is a trusted proxy.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from tests.support import gateways, running_proxy


def rules(url: str, idempotency: str = "{header: Idempotency-Key}") -> str:
    return f"""
gateways:
  g1: {{url: '{url}', region: eu, provider: stripe}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [g1]
    idempotency: {idempotency}
"""


async def test_connection_cannot_strip_the_idempotency_key(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules(g["g1"].url), tmp_path) as p:
            key = f"k-{uuid.uuid4().hex}"
            status, _, _ = await p.post(
                headers={"Idempotency-Key": key, "Connection": "keep-alive, Idempotency-Key"}
            )
            assert status == 200
            [seen] = g["g1"].requests()
            assert seen.headers["Idempotency-Key"] == key


async def test_the_transaction_id_is_payswitchs_never_the_clients(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules(g["g1"].url), tmp_path) as p:
            forged = "someone-elses-transaction"
            status, headers, _ = await p.post(
                headers={"X-Payswitch-Transaction-Id": forged, "X-Payswitch-Attempt-Id": "a1"}
            )
            assert status == 200
            ours = headers["X-Payswitch-Transaction-Id"]
            assert ours != forged
            [seen] = g["g1"].requests()
            assert seen.headers["X-Payswitch-Transaction-Id"] == ours
            assert seen.headers["X-Payswitch-Attempt-Id"] != "a1"
            assert await p.rt.payments.lookup(forged) is None


async def test_scoped_keys_of_two_clients_never_collide_at_the_provider(tmp_path: Path) -> None:
    idem = "{header: Idempotency-Key, scope_header: X-Client-Id}"
    async with gateways("g1") as g:
        async with running_proxy(rules(g["g1"].url, idem), tmp_path) as p:
            key = "order-1"
            alice = await p.post(headers={"Idempotency-Key": key, "X-Client-Id": "alice"})
            bob = await p.post(headers={"Idempotency-Key": key, "X-Client-Id": "bob"})
            assert alice[0] == bob[0] == 200
            assert "Idempotent-Replayed" not in bob[1]
            txn_a = alice[1]["X-Payswitch-Transaction-Id"]
            txn_b = bob[1]["X-Payswitch-Transaction-Id"]
            assert txn_a != txn_b
            sent = [s.headers["Idempotency-Key"] for s in g["g1"].requests()]
            assert len(set(sent)) == 2 and key not in sent
            # Each provider charge is its own payment: nothing was merged.
            ledger = g["g1"].ledger
            assert len(ledger.charges) == 2
            # The same client retrying gets the same derived key and its own replay.
            again = await p.post(headers={"Idempotency-Key": key, "X-Client-Id": "alice"})
            assert again[1]["Idempotent-Replayed"] == "true"
            assert again[1]["X-Payswitch-Transaction-Id"] == txn_a


async def test_forwarding_headers_are_replaced_unless_the_peer_is_trusted(
    tmp_path: Path,
) -> None:
    claimed = {
        "X-Forwarded-For": "6.6.6.6",
        "X-Forwarded-Proto": "https",
        "X-Forwarded-Host": "bank.example",
        "Forwarded": "for=6.6.6.6;proto=https",
        "Content_Length": "0",
    }
    async with gateways("g1") as g:
        async with running_proxy(rules(g["g1"].url), tmp_path) as p:
            assert (await p.post(headers=claimed))[0] == 200
            seen = g["g1"].requests()[-1].headers
            assert seen["X-Forwarded-For"] == "127.0.0.1"
            assert seen["X-Forwarded-Proto"] == "http"
            assert seen["X-Forwarded-Host"].startswith("127.0.0.1:")
            assert "Forwarded" not in seen
            assert "Content_Length" not in seen
        async with running_proxy(
            rules(g["g1"].url), tmp_path, trusted_proxies=("127.0.0.1/32",)
        ) as p:
            assert (await p.post(headers=claimed))[0] == 200
            seen = g["g1"].requests()[-1].headers
            assert seen["X-Forwarded-For"] == "6.6.6.6, 127.0.0.1"
            assert seen["X-Forwarded-Proto"] == "https"
            assert seen["X-Forwarded-Host"] == "bank.example"
            assert seen["Forwarded"] == "for=6.6.6.6;proto=https"
