"""Latency and memory of the idempotency stores: what a claim costs and what 100k keys hold.

Owns: measuring `MemoryIdempotencyStore` and `RedisIdempotencyStore` (claim, complete,
replay latency; memory per 100k completed keys) and printing one table.
Must not: talk to anything but 127.0.0.1, or leave keys behind in Redis (everything goes
under a random prefix that is deleted at the end).

    .venv/bin/python bench/idempotency_bench.py [--keys 100000] [--ops 10000]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import statistics
import time
import tracemalloc
import uuid
from urllib.parse import urlsplit

from redis.asyncio import Redis

from proxy.idempotency.keys import fingerprint
from proxy.idempotency.memory import MemoryIdempotencyStore
from proxy.idempotency.redis_store import RedisIdempotencyStore
from proxy.idempotency.store import Claimed, Completed, IdempotencyStore, StoredResponse

logger = logging.getLogger(__name__)

TTL = 86400.0
LOCK = 30.0


def payment(i: int) -> tuple[str, StoredResponse]:
    """(fingerprint, answer) of a typical payment: ~200 bytes of JSON and three headers,
    all distinct per key so the memory figure shares nothing between keys."""
    request = f'{{"amount":1000,"currency":"EUR","customer":"cus_{i:016d}"}}'.encode()
    body = (
        f'{{"id":"ch_{i:024d}","status":"succeeded","amount":1000,"currency":"eur",'
        + '"x":"'
        + "0" * 96
        + '"}'
    ).encode()
    headers = (
        ("Content-Type", "application/json"),
        ("Date", "Tue, 01 Jul 2025 12:00:00 GMT"),
        ("Request-Id", f"req_{i:016x}"),
    )
    answer = StoredResponse(
        status=201, headers=headers, body=body, gateway="stripe-eu", transaction_id=f"txn-{i}"
    )
    return fingerprint("POST", "/v1/deposits", request), answer


def quantiles(samples_ns: list[int]) -> tuple[float, float, float]:
    """(p50, p99, mean) in microseconds."""
    ordered = sorted(samples_ns)
    p50 = ordered[len(ordered) // 2]
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return p50 / 1000, p99 / 1000, statistics.fmean(ordered) / 1000


async def latency(store: IdempotencyStore, ops: int, tag: str) -> dict[str, list[int]]:
    """Sequential claim, complete and replay on fresh keys: one request at a time."""
    samples: dict[str, list[int]] = {
        "claim": [],
        "complete": [],
        "claim+complete": [],
        "replay": [],
    }
    clock = time.perf_counter_ns
    for i in range(ops):
        key = f"k:{tag}-{i}"
        fp, stored = payment(i)
        t0 = clock()
        claim = await store.claim(key, fp, TTL, lock_ttl=LOCK)
        t1 = clock()
        assert isinstance(claim, Claimed)
        done = await store.complete(key, claim.lease, stored, TTL)
        t2 = clock()
        replay = await store.claim(key, fp, TTL, lock_ttl=LOCK)
        t3 = clock()
        assert done and isinstance(replay, Completed)
        samples["claim"].append(t1 - t0)
        samples["complete"].append(t2 - t1)
        samples["claim+complete"].append(t2 - t0)
        samples["replay"].append(t3 - t2)
    return samples


async def fill(store: IdempotencyStore, keys: int, tag: str, concurrency: int) -> float:
    """Complete `keys` fresh keys, `concurrency` at a time; returns keys per second."""

    async def one(i: int) -> None:
        key = f"k:{tag}-{i}"
        fp, stored = payment(i)
        claim = await store.claim(key, fp, TTL, lock_ttl=LOCK)
        assert isinstance(claim, Claimed)
        assert await store.complete(key, claim.lease, stored, TTL)

    start = time.perf_counter()
    for base in range(0, keys, concurrency):
        await asyncio.gather(*(one(i) for i in range(base, min(keys, base + concurrency))))
    return keys / (time.perf_counter() - start)


async def bench_memory(keys: int, ops: int) -> tuple[dict[str, list[int]], float, int]:
    store = MemoryIdempotencyStore(max_bytes=1 << 40)
    samples = await latency(store, ops, "lat")
    rate = await fill(store, keys, "rate", concurrency=1)
    await store.close()

    # Measured apart from the rate: tracing every allocation slows the fill several times.
    gc.collect()
    tracemalloc.start()
    before, _ = tracemalloc.get_traced_memory()
    store = MemoryIdempotencyStore(max_bytes=1 << 40)
    await fill(store, keys, "mem", concurrency=1)
    gc.collect()
    after, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(store) == keys
    await store.close()
    return samples, rate, after - before


async def bench_redis(url: str, keys: int, ops: int) -> tuple[dict[str, list[int]], float, int]:
    prefix = f"payswitch-bench-{uuid.uuid4().hex}:"
    client = Redis.from_url(url, max_connections=256)
    store = RedisIdempotencyStore(client, prefix=prefix)
    try:
        await client.ping()
        samples = await latency(store, ops, "lat")
        rate = await fill(store, keys, "mem", concurrency=200)
        # MEMORY USAGE per key, sampled, is this store's own footprint; INFO's used_memory
        # would also count whatever else shares the server.
        sample = min(keys, 2000)
        step = max(1, keys // sample)
        total = 0
        for i in range(0, keys, step)[:sample]:
            usage = await client.memory_usage(f"{prefix}idem:{{k:mem-{i}}}:r", samples=0)
            total += int(usage or 0)
        return samples, rate, total * keys // sample
    finally:
        stale = [key async for key in client.scan_iter(match=f"{prefix}*", count=5000)]
        for start in range(0, len(stale), 5000):
            await client.delete(*stale[start : start + 5000])
        await client.aclose()


def loopback_only(url: str) -> str:
    host = urlsplit(url).hostname
    if host != "127.0.0.1":
        raise SystemExit(f"refusing {url!r}: this benchmark only talks to 127.0.0.1")
    return url


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--keys", type=int, default=100_000, help="keys for the memory figure")
    parser.add_argument("--ops", type=int, default=10_000, help="sequential ops for latency")
    parser.add_argument("--redis-url", type=loopback_only, default="redis://127.0.0.1:6379/0")
    args = parser.parse_args()

    results = {
        "memory": await bench_memory(args.keys, args.ops),
        "redis": await bench_redis(args.redis_url, args.keys, args.ops),
    }
    per = 100_000 / args.keys
    print(f"\nidempotency stores: {args.ops} sequential ops, memory for {args.keys} completed keys")
    body = len(payment(0)[1].body)
    print(f"(each completed key holds a {body}-byte body, 3 headers and its fingerprint)\n")
    print(f"{'store':<8} {'operation':<15} {'p50 µs':>9} {'p99 µs':>9} {'mean µs':>9}")
    for name, (samples, _, _) in results.items():
        for op, values in samples.items():
            p50, p99, mean = quantiles(values)
            print(f"{name:<8} {op:<15} {p50:>9.1f} {p99:>9.1f} {mean:>9.1f}")
    print(f"\n{'store':<8} {'fill keys/s':>12} {'MiB per 100k keys':>18} {'bytes per key':>14}")
    for name, (_, rate, used) in results.items():
        print(f"{name:<8} {rate:>12,.0f} {used * per / 2**20:>18.1f} {used / args.keys:>14,.0f}")


if __name__ == "__main__":
    asyncio.run(main())
