"""Payment faults per after_ambiguous policy: what is charged twice, what payswitch sees.

Three simulated gateways (s1 and s2 of provider stripe, a1 of adyen) behind payswitch;
s1 takes every payment and then misbehaves. For each policy (never, same-provider,
any-gateway) and each fault, payments with unique Idempotency-Keys are sent at a steady
rate and the simulated providers' ledger (which dedupes a key per provider, as real ones
do) says what was really charged. Then, the cost of the idempotency layer: latency
through a route without keys, with the in-memory store and with the Redis store.

Run: .venv/bin/python bench/payment_faults.py [--payments N] [--quick]
Only 127.0.0.1 is used; Redis must answer on 127.0.0.1:6379 for the last part.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import redis.asyncio as aioredis

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from proxy.events import Severity  # noqa: E402
from proxy.sim import FakeGateway  # noqa: E402
from tests.support import Proxy, gateways, running_proxy  # noqa: E402

POLICIES = ("never", "same-provider", "any-gateway")
PROVIDERS = {"s1": "stripe", "s2": "stripe", "a1": "adyen"}
REDIS_URL = "redis://127.0.0.1:6379/0"


async def hang(g: FakeGateway) -> None:
    g.set(mode="hang", charge=True)


async def answer_late(g: FakeGateway) -> None:
    g.set(mode="ok", delay=0.8)


async def reset(g: FakeGateway) -> None:
    g.set(mode="reset", charge=True)


FAULTS: dict[str, tuple[str, Callable[[FakeGateway], Awaitable[None]]]] = {
    "hang": ("takes the payment and hangs", hang),
    "late": ("takes the payment, answers after 800 ms", answer_late),
    "reset": ("takes the payment, resets the connection", reset),
}


def rules(
    urls: dict[str, str], policy: str, idempotency: str | None = "{header: Idempotency-Key}"
) -> str:
    gws = "\n".join(
        f"  {n}: {{url: '{u}', region: eu, provider: {PROVIDERS.get(n, n)}}}"
        for n, u in urls.items()
    )
    idem = f"    idempotency: {idempotency}\n" if idempotency else ""
    return f"""
gateways:
{gws}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [{", ".join(urls)}]
    timeouts: {{per_try: 300ms, total: 3s, abandoned: 2s}}
    retry: {{attempts: 3, on: [connect-failure, timeout, reset, 503], after_ambiguous: {policy}}}
{idem}"""


async def drive(p: Proxy, n: int, rate: float) -> list[tuple[int, dict[str, str], bytes]]:
    """`n` payments with unique keys at `rate` per second; every answer."""

    async def one(i: int) -> tuple[int, dict[str, str], bytes]:
        await asyncio.sleep(i / rate)
        return await p.post(headers={"Idempotency-Key": f"pay-{uuid.uuid4().hex}"})

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def fault_row(policy: str, fault: str, n: int, rate: float, tmp: Path) -> dict[str, Any]:
    async with gateways("s1", "s2", "a1", providers=PROVIDERS) as g:
        urls = {name: gw.url for name, gw in g.items()}
        async with running_proxy(rules(urls, policy), tmp) as p:
            await FAULTS[fault][1](g["s1"])
            answers = await drive(p, n, rate)
            await asyncio.sleep(2.5)  # let abandoned attempts end and report
            ledger = g["s1"].ledger
            dupes = [
                e
                for e in p.events.of("payment.duplicate_suspected")
                if e.severity >= Severity.CRITICAL
            ]
            twice = {
                c.transaction_id
                for c in ledger.charges
                if len(ledger.by_transaction(c.transaction_id or "")) > 1
            }
            flagged = {str(e.fields["transaction_id"]) for e in dupes}
            unknown = sum(
                1
                for s, _, b in answers
                if s >= 500 and orjson.loads(b).get("title") == "Payment outcome unknown"
            )
            return {
                "policy": policy,
                "fault": fault,
                "payments": n,
                "charged_twice": len(twice),
                "duplicates_flagged": len(flagged),
                "deduped_pairs_reported": len(p.events.of("payment.duplicate_suspected"))
                - len(dupes),
                "charged_twice_unflagged": len(twice - flagged),
                "late_success_events": len(p.events.of("payment.late_success")),
                "client_errors": sum(1 for s, _, _ in answers if s >= 400),
                "of_which_outcome_unknown": unknown,
                "s1_share": round(
                    sum(1 for _, h, _ in answers if h.get("X-Payswitch-Gateway") == "s1") / n, 3
                ),
            }


async def latency(store: str, n: int, tmp: Path) -> dict[str, Any]:
    """Sequential payment latency through payswitch with the given idempotency set-up."""
    prefix = f"payswitch-bench-{uuid.uuid4().hex}:"
    opts: dict[str, Any] = {}
    idem: str | None = "{header: Idempotency-Key}"
    if store == "none":
        idem = None
    elif store == "redis":
        opts = {"idempotency_store": REDIS_URL, "idempotency_prefix": prefix}
    try:
        async with (
            gateways("s1") as g,
            running_proxy(rules({"s1": g["s1"].url}, "never", idem), tmp, **opts) as p,
        ):
            for _ in range(50):
                await p.post(headers={"Idempotency-Key": f"warm-{uuid.uuid4().hex}"})
            samples = []
            for _ in range(n):
                t0 = time.perf_counter()
                status, _, _ = await p.post(headers={"Idempotency-Key": f"lat-{uuid.uuid4().hex}"})
                samples.append(time.perf_counter() - t0)
                assert status == 200
            replay_key = {"Idempotency-Key": f"rep-{uuid.uuid4().hex}"}
            await p.post(headers=replay_key)
            replays = []
            for _ in range(min(n, 500)):
                t0 = time.perf_counter()
                await p.post(headers=replay_key)
                replays.append(time.perf_counter() - t0)
            samples.sort()
            replays.sort()
            return {
                "store": store,
                "p50_ms": round(samples[len(samples) // 2] * 1000, 3),
                "p99_ms": round(samples[int(len(samples) * 0.99)] * 1000, 3),
                "mean_ms": round(statistics.fmean(samples) * 1000, 3),
                "replay_p50_ms": round(replays[len(replays) // 2] * 1000, 3)
                if store != "none"
                else None,
            }
    finally:
        if store == "redis":
            client = aioredis.Redis.from_url(REDIS_URL)
            keys = [k async for k in client.scan_iter(match=f"{prefix}*")]
            if keys:
                await client.delete(*keys)
            await client.aclose()


def table(rows: list[dict[str, Any]]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += [
        "| " + " | ".join("-" if r[c] is None else str(r[c]) for c in cols) + " |" for r in rows
    ]
    return "\n".join(out)


async def main_async(args: argparse.Namespace) -> int:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, policy in enumerate(POLICIES):
            for j, fault in enumerate(FAULTS):
                d = Path(tmp) / f"f{i}{j}"
                d.mkdir()
                rows.append(await fault_row(policy, fault, args.payments, args.rate, d))
                print(f"{policy:14} {fault:6} {rows[-1]}", file=sys.stderr)
        lat = []
        for k, store in enumerate(("none", "memory", "redis")):
            d = Path(tmp) / f"l{k}"
            d.mkdir()
            lat.append(await latency(store, args.latency_requests, d))
    print("\nFaults: s1 " + "; ".join(f"{k} = {v[0]}" for k, v in FAULTS.items()))
    print(table(rows))
    print(
        "\nLatency of one payment through payswitch (sequential, simulated gateway answering at once)"
    )
    print(table(lat))
    out = REPO / "bench" / "out"
    out.mkdir(exist_ok=True)
    path = out / f"payment-faults-{time.strftime('%Y%m%dT%H%M%S')}.json"
    path.write_text(json.dumps({"faults": rows, "latency": lat}, indent=2))
    print(f"\nresults: {path}")
    bad = [
        r
        for r in rows
        if r["charged_twice_unflagged"] or (r["policy"] != "any-gateway" and r["charged_twice"])
    ]
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--payments", type=int, default=150, help="payments per policy and fault (150)")
    ap.add_argument("--rate", type=float, default=50.0, help="payments per second (50)")
    ap.add_argument(
        "--latency-requests", type=int, default=2000, help="sequential payments per store (2000)"
    )
    ap.add_argument(
        "--quick", action="store_true", help="60 payments per cell, 500 latency samples"
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.payments, args.latency_requests = 60, 500
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
