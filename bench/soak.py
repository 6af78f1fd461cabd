"""make soak: a long run of mixed payments through faults, reload storms and a Redis restart.

Owns: driving a real payswitch process (Redis store, events to a file, rules in a
ConfigMap-shaped directory) at a steady rate of keyed and unkeyed POSTs while gateways
misbehave in turn, rules are rewritten in bursts and Redis is restarted; then checking what
must hold: every request that was dispatched has exactly one terminal transaction event,
no payment is charged twice, nothing answers 500, and RSS stays flat after warm-up.
Must not: send traffic anywhere but 127.0.0.1; it stops by itself.

    .venv/bin/python bench/soak.py --minutes 30      # make soak

payswitch is the native build, as the image ships it (`make native` first); `--python`
soaks the sources instead.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.procs import Processes, free_port, rss_mib, wait_ok
from bench.reload_bench import RulesDir
from bench.targets import native_env, payswitch_binary
from proxy.sim import Behaviour, FakeGateway, Ledger

GATEWAYS = {"stripe-eu": "stripe", "stripe-us": "stripe", "adyen-eu": "adyen", "adyen-us": "adyen"}
REGION = {"stripe-eu": "eu", "adyen-eu": "eu", "stripe-us": "us", "adyen-us": "us"}
BODY = b'{"amount": 1000, "currency": "EUR", "reference": "soak"}'
TERMINAL = ("transaction.succeeded", "transaction.failed", "transaction.unknown")

#: One fault after another, each for a phase, then back to healthy: (gateway, behaviour).
FAULTS: list[tuple[str, Behaviour | None]] = [
    ("stripe-eu", Behaviour(mode="hang")),
    ("adyen-eu", None),  # connection refused
    ("stripe-eu", Behaviour(mode="status", status=503)),
    ("adyen-eu", Behaviour(mode="throttle", retry_after=3)),
    ("stripe-eu", Behaviour(mode="reset")),
    ("adyen-eu", Behaviour(mode="ok", delay=0.4)),
]


def rules_text(urls: dict[str, str], *, weight: int) -> str:
    gws = "\n".join(
        f"  {n}: {{url: '{u}', region: {REGION[n]}, provider: {GATEWAYS[n]},"
        f" weight: {weight if n == 'stripe-eu' else 1}}}"
        for n, u in urls.items()
    )
    names = ", ".join(urls)
    return f"""
gateways:
{gws}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{header: X-Region, default: eu, fallback: {{eu: [us], us: [eu]}}}}
    gateways: [{names}]
    timeouts: {{per_try: 300ms, total: 3s}}
    retry: {{attempts: 3, on: [connect-failure, timeout, reset, 503], after_ambiguous: same-provider}}
    idempotency: {{header: Idempotency-Key, ttl: 1h}}
"""


def start_redis(procs: Processes, port: int) -> None:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is needed: apt-get install redis-server")
    argv = [exe, "--port", str(port)]
    argv += ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    started = procs.start(f"redis-{port}", argv, core=1)
    deadline = time.monotonic() + 10
    while (
        subprocess.run(
            ["redis-cli", "-p", str(port), "ping"], capture_output=True, check=False
        ).stdout.strip()
        != b"PONG"
    ):
        if time.monotonic() > deadline:
            raise SystemExit(f"redis did not start:\n{started.log_tail()}")
        time.sleep(0.05)


@contextlib.asynccontextmanager
async def started_gateways() -> AsyncIterator[dict[str, FakeGateway]]:
    ledger = Ledger()
    gws = {n: FakeGateway(n, provider=p, ledger=ledger) for n, p in GATEWAYS.items()}
    for g in gws.values():
        await g.start()
    try:
        yield gws
    finally:
        for g in gws.values():
            await g.stop()


class Load:
    """A steady stream of POSTs; half keyed, a tenth of the keyed ones retried once."""

    def __init__(self, http: aiohttp.ClientSession, url: str, rate: float) -> None:
        self.http, self.url, self.rate = http, url, rate
        self.statuses: Counter[int] = Counter()
        self.dispatched: Counter[str] = Counter()  # transaction id -> answers it dispatched
        self.untracked: Counter[str] = Counter()  # answers with no transaction: why
        self.errors = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def one(self, n: int) -> None:
        headers = {"Content-Type": "application/json"}
        if n % 2 == 0:
            headers["Idempotency-Key"] = f"soak-{uuid.uuid4().hex}"
        if n % 5 == 0:
            headers["X-Region"] = "us"
        for _ in range(2 if n % 20 == 0 else 1):
            try:
                async with self.http.post(self.url, data=BODY, headers=headers) as resp:
                    body = await resp.read()
                    self.statuses[resp.status] += 1
                    txn = resp.headers.get("X-Payswitch-Transaction-Id")
                    if txn and resp.headers.get("Idempotent-Replayed") != "true":
                        # A retry of a key whose first answer was not final is dispatched
                        # again under the same transaction id: one terminal event each.
                        self.dispatched[txn] += 1
                    elif not txn:
                        slug = orjson.loads(body).get("type", "?") if body else "?"
                        self.untracked[f"{resp.status} {slug.rsplit('/', 1)[-1]}"] += 1
            except (aiohttp.ClientError, TimeoutError):
                self.errors += 1

    async def run(self, until: float) -> None:
        n = 0
        start = time.monotonic()
        while time.monotonic() < until:
            task = asyncio.get_running_loop().create_task(self.one(n))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
            n += 1
            await asyncio.sleep(max(0.0, start + n / self.rate - time.monotonic()))
        await asyncio.gather(*self._tasks)


async def chaos(
    gws: dict[str, FakeGateway],
    rules: RulesDir,
    urls: dict[str, str],
    procs: Processes,
    redis_port: int,
    until: float,
    phase: float,
    log: list[str],
) -> None:
    """Faults one after another; a reload storm every other phase; Redis restarted every
    fifth phase."""
    i = 0
    t0 = time.monotonic()
    while time.monotonic() + phase <= until:
        name, behaviour = FAULTS[i % len(FAULTS)]
        what = "refuses connections" if behaviour is None else describe(behaviour)
        log.append(f"+{time.monotonic() - t0:6.0f}s {name} {what}")
        if behaviour is None:
            await gws[name].down()
        else:
            await gws[name].up(behaviour)
        if i % 2 == 1:
            for k in range(20):  # a storm: twenty rewrites in two seconds, one of them bad
                text = rules_text(urls, weight=1 + k % 3) if k != 7 else "gateways: {x: ["
                rules.publish(text)
                await asyncio.sleep(0.1)
            rules.publish(rules_text(urls, weight=3))
            log.append(f"+{time.monotonic() - t0:6.0f}s reload storm (20 writes, 1 invalid)")
        if i % 5 == 4:
            log.append(f"+{time.monotonic() - t0:6.0f}s redis restart (5 s down)")
            for started in [s for s in procs._running if s.name.startswith("redis")]:
                procs.stop(started, grace=2)
            await asyncio.sleep(5)
            start_redis(procs, redis_port)
        await asyncio.sleep(max(0.0, t0 + (i + 1) * phase - time.monotonic()) * 0.5)
        await gws[name].up(Behaviour())
        await asyncio.sleep(max(0.0, t0 + (i + 1) * phase - time.monotonic()))
        i += 1


def describe(b: Behaviour) -> str:
    if b.mode == "status":
        return f"answers {b.status}"
    if b.mode == "throttle":
        return f"answers 429, Retry-After {b.retry_after}"
    if b.mode == "ok":
        return f"slows to {b.delay * 1000:.0f} ms"
    return {"hang": "takes payments and hangs", "reset": "takes payments and resets"}.get(
        b.mode, b.mode
    )


def terminal_events(path: Path) -> Counter[str]:
    counts: Counter[str] = Counter()
    for line in path.read_bytes().splitlines():
        with contextlib.suppress(orjson.JSONDecodeError):
            event = orjson.loads(line)
            if event.get("kind") in TERMINAL:
                counts[event["fields"]["transaction_id"]] += 1
    return counts


async def soak(args: argparse.Namespace, workdir: Path) -> int:
    redis_port, listen, admin = free_port(), free_port(), free_port()
    events = workdir / "events.jsonl"
    with Processes(workdir) as procs:
        start_redis(procs, redis_port)
        async with started_gateways() as gws:
            urls = {n: g.url for n, g in gws.items()}
            rules = RulesDir(workdir / "rules", configmap=True)
            rules.publish(rules_text(urls, weight=3))
            argv = [str(payswitch_binary()), "run", "--rules", str(rules.root)]
            argv += ["--listen", f"127.0.0.1:{listen}", "--admin", f"127.0.0.1:{admin}"]
            argv += ["--events", str(events), "--access-log", "off", "--log-level", "warning"]
            argv += ["--idempotency-store", f"redis://127.0.0.1:{redis_port}/0"]
            ps = procs.start("payswitch", argv, core=0, env={} if args.python else native_env())
            await asyncio.to_thread(wait_ok, ps, f"http://127.0.0.1:{admin}/readyz", timeout=20)
            print(f"soak: payswitch build: {await build_of(admin)}", flush=True)
            duration = args.minutes * 60
            until = time.monotonic() + duration
            rss: list[tuple[float, float]] = []
            log: list[str] = []
            t0 = time.monotonic()

            async def sample() -> None:
                while time.monotonic() < until:
                    value = rss_mib(ps.pid)
                    if value is not None:
                        rss.append((time.monotonic() - t0, value))
                    await asyncio.sleep(args.sample)

            timeout = aiohttp.ClientTimeout(total=10)
            connector = aiohttp.TCPConnector(limit=200)
            async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
                load = Load(http, f"http://127.0.0.1:{listen}/v1/deposits", args.rate)
                phase = max(10.0, duration / max(6, args.minutes * 2))
                await asyncio.gather(
                    load.run(until),
                    chaos(gws, rules, urls, procs, redis_port, until, phase, log),
                    sample(),
                )
            await asyncio.sleep(args.settle)  # abandoned attempts end, events flush
            procs.stop(ps, grace=30)
            ledger = next(iter(gws.values())).ledger
    counts = terminal_events(events)
    return report(args, load, counts, ledger, rss, log)


def report(
    args: argparse.Namespace,
    load: Load,
    counts: Counter[str],
    ledger: Ledger,
    rss: list[tuple[float, float]],
    log: list[str],
) -> int:
    missing = [t for t, n in load.dispatched.items() if counts.get(t, 0) < n]
    repeated = [t for t, n in load.dispatched.items() if counts.get(t, 0) > n]
    twice = ledger.charged_twice()
    warm = [v for t, v in rss if t >= args.warmup]
    first = warm[: max(1, len(warm) // 3)]
    last = warm[-max(1, len(warm) // 3) :]
    growth = (sum(last) / len(last)) / (sum(first) / len(first)) - 1 if warm else 0.0
    print(f"soak: {args.minutes:g} min at {args.rate:g} req/s")
    print("\n".join(log))
    print(f"answers by status: {dict(sorted(load.statuses.items()))}; client errors {load.errors}")
    print(f"answered without a transaction (refused before dispatch): {dict(load.untracked)}")
    print(f"transactions: {len(load.dispatched)}; missing a terminal event: {len(missing)};")
    print(f"  with one too many: {len(repeated)}; charges: {len(ledger.charges)};")
    print(f"  payments charged twice: {twice}")
    print("RSS MiB over time:")
    step = max(1, len(rss) // 30)
    for t, v in rss[::step]:
        print(f"  +{t:6.0f}s {v:6.1f} {'#' * int(v / 2)}")
    print(f"RSS after warm-up: first third {sum(first) / max(1, len(first)):.1f} MiB,")
    print(f"  last third {sum(last) / max(1, len(last)):.1f} MiB ({growth:+.1%})")
    bad = []
    if missing or repeated:
        bad.append("terminal events")
    if twice:
        bad.append("double charges")
    if load.statuses.get(500):
        bad.append("500 answers")
    if growth > args.max_growth:
        bad.append("RSS growth")
    print("FAILED: " + ", ".join(bad) if bad else "ok: every expectation holds")
    return 1 if bad else 0


async def build_of(admin: int) -> str:
    """Which build serves, as payswitch_build_info says."""
    async with (
        aiohttp.ClientSession() as session,
        session.get(f"http://127.0.0.1:{admin}/metrics") as resp,
    ):
        text = await resp.text()
    for line in text.splitlines():
        if line.startswith("payswitch_build_info{"):
            return line.split('build="', 1)[1].split('"', 1)[0]
    return "unknown"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--rate", type=float, default=100.0, help="requests per second")
    parser.add_argument("--sample", type=float, default=10.0, help="seconds between RSS samples")
    parser.add_argument("--warmup", type=float, default=120.0, help="seconds before RSS counts")
    parser.add_argument("--settle", type=float, default=35.0, help="seconds to wait at the end")
    parser.add_argument("--max-growth", type=float, default=0.10)
    parser.add_argument("--python", action="store_true", help="the sources, not the native build")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="payswitch-soak-") as tmp:
        return asyncio.run(soak(args, Path(tmp)))


if __name__ == "__main__":
    raise SystemExit(main())
