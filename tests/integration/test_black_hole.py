"""Gateways that drop SYNs: a connect still pending when the per-try timer fires reached no
gateway, so the payment goes to any allowed gateway and uses up no attempt (DESIGN §5.1)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.support import black_hole, gateways, running_proxy


@contextlib.contextmanager
def black_hole_url() -> Iterator[str]:
    """The URL of a gateway that drops SYNs (tests/support.py `black_hole`)."""
    with black_hole() as port:
        yield f"http://127.0.0.1:{port}"


def rules(urls: dict[str, str], providers: dict[str, str], connect: str) -> str:
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
    timeouts: {{per_try: 300ms, connect: {connect}, total: 3s}}
    retry: {{attempts: 1, on: [connect-failure, timeout, reset, 503], after_ambiguous: same-provider}}
    idempotency: {{header: Idempotency-Key}}
"""


async def test_black_hole_gateways_fail_over_to_another_provider(tmp_path: Path) -> None:
    # attempts: 1 — only an attempt judged provably unsent lets a second gateway be tried.
    providers = {"s1": "stripe", "s2": "stripe", "a1": "adyen"}
    with black_hole_url() as s1, black_hole_url() as s2:
        async with gateways("a1", providers=providers) as g:
            urls = {"s1": s1, "s2": s2, "a1": g["a1"].url}
            # connect equals per_try: the per-try timer and the connect timer race, and
            # either way the attempt reached no gateway.
            async with running_proxy(rules(urls, providers, "300ms"), tmp_path) as p:

                async def pay() -> tuple[int, dict[str, str]]:
                    hdrs = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
                    status, headers, _ = await p.post(headers=hdrs)
                    return status, headers

                results = []
                for _ in range(5):
                    results += await asyncio.gather(*(pay() for _ in range(10)))
                failures = [(s, h) for s, h in results if s != 200]
                assert not failures, f"{len(failures)} client failures: {failures[:3]}"
                assert {h["X-Payswitch-Gateway"] for _, h in results} == {"a1"}
                assert g["a1"].ledger.charged_twice() == 0
                assert len(g["a1"].requests()) == 50
                unknown = p.events.kinds("transaction.unknown")
                assert not unknown


async def test_per_try_timer_while_connecting_is_judged_unsent(tmp_path: Path) -> None:
    """The per-try timer starts before the connect does, so it fires first on a black
    hole: the attempt is cancelled, reported as a connect timeout, and the payment goes to
    the other provider although `attempts` is 1."""
    providers = {"s1": "stripe", "a1": "adyen"}
    with black_hole_url() as s1:
        async with gateways("a1", providers=providers) as g:
            urls = {"s1": s1, "a1": g["a1"].url}
            async with running_proxy(rules(urls, providers, "300ms"), tmp_path) as p:
                status, headers, body = await p.post(
                    headers={"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
                )
                assert status == 200, body
                assert headers["X-Payswitch-Gateway"] == "a1"
                assert headers["X-Payswitch-Attempts"] == "2"
                reasons = p.rt.registry.get_sample_value(
                    "payswitch_retries_total", {"route": "deposits", "reason": "connect_timeout"}
                )
                assert reasons == 1.0
                [event] = p.events.of("transaction.succeeded")
                assert event.fields["gateway"] == "a1"
