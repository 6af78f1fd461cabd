"""Hot reload figures: how fast new rules serve, and whether a reload storm loses requests.

Owns: (a) the time from a rules write to the first request answered by the gateway the new
rules route to, p50/p99 over many reloads, for a watched file rewrite, a ConfigMap `..data`
swap and `POST /admin/reload`; (b) a storm of rule replacements (two valid sets routing to
different gateways, and invalid ones) under steady concurrent load, counting failed
requests and answers from a gateway no valid set allowed (both must be zero), with the
changes seen by the watcher (file rewrites, `..data` swaps) and sent by `POST /admin/reload`.
Must not: leave a process behind (every start goes through `procs.Processes`), or send
anything off loopback.

payswitch runs as `payswitch run` pinned to the proxy core; the simulated gateways and the
load run in this process on the other core.

Usage: .venv/bin/python bench/reload_bench.py [--reloads N] [--storm-seconds S]
       [--clients N] [--change-every S]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make `bench` and `proxy` importable, and stop bench/ itself from
    # shadowing top-level modules.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

import aiohttp

from bench.procs import BenchError, Processes, free_port, wait_ok
from proxy.aio import cancel_and_wait, spawn
from proxy.sim import FakeGateway

OUT_DIR = Path(__file__).resolve().parent / "out"
PROXY_CORE = 0
LOAD_CORE = 1
READY_TIMEOUT = 30.0
SERVE_TIMEOUT = 5.0  # a reload not serving within this is counted as timed out
BODY = b'{"amount": 100, "currency": "EUR"}'
METHODS = ("watch-file", "watch-configmap", "admin")
LOAD_A = ("a1", "a2")
LOAD_B = ("b1", "b2")
DECOY = "x1"  # named only by invalid rules: an answer from it means they leaked


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    doc = __doc__ or ""
    parser = argparse.ArgumentParser(description=doc.splitlines()[0])
    parser.add_argument("--reloads", type=int, default=100, help="reloads per method (100)")
    parser.add_argument("--storm-seconds", type=float, default=8.0, help="per storm (8)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (32)")
    parser.add_argument(
        "--change-every", type=float, default=0.05, help="seconds between rule changes (0.05)"
    )
    parser.add_argument(
        "--max-requests", type=int, default=200_000, help="cap on requests per storm"
    )
    args = parser.parse_args(argv)
    if args.reloads < 50:
        parser.error("--reloads must be >= 50 for a p99 worth reading")
    if not 1 <= args.storm_seconds <= 30 or args.clients < 1 or args.change_every < 0.005:
        parser.error("--storm-seconds in [1, 30], --clients >= 1, --change-every >= 0.005")
    return args


# -- rules --------------------------------------------------------------------------------


def rules_text(urls: Mapping[str, str], route_to: Sequence[str]) -> str:
    lines = ["gateways:"]
    lines += [f"  {name}: {{url: '{url}', region: eu}}" for name, url in urls.items()]
    lines += [
        "routes:",
        "  - name: deposits",
        "    match: {path_prefix: /v1/deposits, methods: [POST]}",
        "    region: {default: eu}",
        f"    gateways: [{', '.join(route_to)}]",
        "    timeouts: {per_try: 2s, total: 5s}",
    ]
    return "\n".join(lines) + "\n"


def storm_variants(urls: Mapping[str, str]) -> list[str]:
    """Valid A, invalid YAML, valid B, a schema violation routing to the decoy: every swap
    between A and B removes two gateways and adds two."""
    a = rules_text({n: urls[n] for n in LOAD_A}, LOAD_A)
    b = rules_text({n: urls[n] for n in LOAD_B}, LOAD_B)
    decoy = rules_text({DECOY: urls[DECOY]}, [DECOY]).replace("per_try: 2s", "per_try: soon")
    return [a, "gateways: {a1: [", b, decoy]


class RulesDir:
    """Where payswitch reads its rules, and how a change is published there."""

    def __init__(self, root: Path, *, configmap: bool) -> None:
        self.root = root
        self.configmap = configmap
        self._stamps = itertools.count(1)
        root.mkdir(parents=True)

    def publish(self, text: str) -> None:
        if self.configmap:
            self._swap_data(text)
        else:
            # What a deploy tool does: readers see the old file or the new one, whole.
            tmp = self.root / ".rules.yaml.tmp"
            tmp.write_text(text, encoding="utf-8")
            os.replace(tmp, self.root / "rules.yaml")

    def _swap_data(self, text: str) -> None:
        """The kubelet's ConfigMap update: a fresh `..<stamp>` dir, a `..data_tmp` link to
        it renamed over `..data`, the old dir removed; `rules.yaml -> ..data/rules.yaml`."""
        stamp = f"..2026_11_25_13_00_00.{next(self._stamps)}"
        (self.root / stamp).mkdir()
        (self.root / stamp / "rules.yaml").write_text(text, encoding="utf-8")
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)
        os.replace(tmp, data)
        link = self.root / "rules.yaml"
        if not link.is_symlink():
            link.symlink_to(Path("..data") / "rules.yaml")
        if old is not None:
            shutil.rmtree(self.root / old)


# -- payswitch ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Payswitch:
    url: str
    admin_url: str
    watching: bool


@contextlib.asynccontextmanager
async def payswitch(
    procs: Processes, name: str, rules: RulesDir, *, watch: bool
) -> AsyncIterator[Payswitch]:
    listen, admin = free_port(), free_port()
    argv = [
        sys.executable,
        "-m",
        "proxy",
        "run",
        "--rules",
        str(rules.root),
        "--listen",
        f"127.0.0.1:{listen}",
        "--admin",
        f"127.0.0.1:{admin}",
        "--events",
        "off",
        "--access-log",
        "off",
        "--log-level",
        "warning",
    ]
    if not watch:
        argv.append("--no-watch")
    started = procs.start(name, argv, core=PROXY_CORE)
    try:
        admin_url = f"http://127.0.0.1:{admin}"
        await asyncio.to_thread(wait_ok, started, admin_url + "/readyz", timeout=READY_TIMEOUT)
        yield Payswitch(f"http://127.0.0.1:{listen}/v1/deposits", admin_url, watch)
    finally:
        await asyncio.to_thread(procs.stop, started)


async def pay(http: aiohttp.ClientSession, ps: Payswitch) -> tuple[int, str]:
    async with http.post(ps.url, data=BODY) as resp:
        await resp.read()
        return resp.status, resp.headers.get("X-Payswitch-Gateway", "-")


async def reload_counts(http: aiohttp.ClientSession, ps: Payswitch) -> dict[str, float]:
    """payswitch_config_reloads_total by result, as scraped from /metrics."""
    async with http.get(ps.admin_url + "/metrics") as resp:
        text = await resp.text()
    counts: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("payswitch_config_reloads_total{"):
            labels, _, value = line.rpartition(" ")
            counts[labels.split('"')[1]] = float(value)
    return counts


# -- (a) time from a write to the new rules serving ----------------------------------------


@dataclass(slots=True, kw_only=True)
class Latency:
    method: str
    reloads: int
    samples_ms: list[float] = field(default_factory=list)
    timed_out: int = 0
    failed: int = 0  # non-200 answers or errors while polling
    wrong_gateway: int = 0  # answered by neither the old nor the new gateway

    def summary(self) -> dict[str, Any]:
        s = sorted(self.samples_ms)
        return {
            "method": self.method,
            "reloads": self.reloads,
            "p50_ms": round(_quantile(s, 0.50), 2) if s else None,
            "p99_ms": round(_quantile(s, 0.99), 2) if s else None,
            "max_ms": round(s[-1], 2) if s else None,
            "mean_ms": round(statistics.fmean(s), 2) if s else None,
            "timed_out": self.timed_out,
            "failed": self.failed,
            "wrong_gateway": self.wrong_gateway,
        }


def _quantile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank quantile: the smallest value with at least q of the samples at or below."""
    rank = max(1, -(-len(sorted_values) * q // 1))
    return sorted_values[int(rank) - 1]


async def time_to_serve(
    http: aiohttp.ClientSession,
    ps: Payswitch,
    method: str,
    rules: RulesDir,
    sets: Mapping[str, str],
    reloads: int,
) -> Latency:
    """Alternate between `sets` (gateway name -> rules routing only to it) `reloads` times,
    each time timing from the write to the first answer from the newly routed gateway.
    """
    result = Latency(method=method, reloads=reloads)
    current = "a1"
    for _ in range(reloads):
        old, new = current, ("b1" if current == "a1" else "a1")
        t0 = time.perf_counter()
        rules.publish(sets[new])
        if not ps.watching:
            async with http.post(ps.admin_url + "/admin/reload") as resp:
                await resp.read()
                if resp.status != 200:
                    result.failed += 1
        end = t0 + SERVE_TIMEOUT
        while True:
            try:
                status, gw = await pay(http, ps)
            except (aiohttp.ClientError, TimeoutError):
                status, gw = 0, "-"
            if status != 200:
                result.failed += 1
            elif gw == new:
                result.samples_ms.append((time.perf_counter() - t0) * 1000)
                break
            elif gw != old:
                result.wrong_gateway += 1
            if time.perf_counter() > end:
                result.timed_out += 1
                break
        current = new
        # The watcher debounces bursts: let it settle so each reload is timed alone.
        await asyncio.sleep(0.02)
    return result


# -- (b) requests lost during a reload storm ------------------------------------------------


@dataclass(slots=True, kw_only=True)
class Storm:
    method: str
    clients: int
    seconds: float
    change_every: float
    sent: int = 0
    ok: int = 0
    failed: int = 0
    wrong_gateway: int = 0
    changes: int = 0
    reloads: dict[str, float] = field(default_factory=dict)
    by_gateway: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)  # the first few, to explain a failure


async def storm(
    http: aiohttp.ClientSession,
    ps: Payswitch,
    method: str,
    change: Callable[[int], Awaitable[None]],
    args: argparse.Namespace,
) -> Storm:
    result = Storm(
        method=method,
        clients=args.clients,
        seconds=args.storm_seconds,
        change_every=args.change_every,
    )
    allowed = {*LOAD_A, *LOAD_B}
    before = await reload_counts(http, ps)
    loop = asyncio.get_running_loop()
    end = loop.time() + args.storm_seconds

    def failure(what: str) -> None:
        result.failed += 1
        if len(result.errors) < 5:
            result.errors.append(what)

    async def client() -> None:
        while loop.time() < end and result.sent < args.max_requests:
            result.sent += 1
            try:
                status, gw = await pay(http, ps)
            except (aiohttp.ClientError, TimeoutError) as exc:
                failure(repr(exc))
                continue
            if status != 200:
                failure(f"{status} via {gw}")
                continue
            result.by_gateway[gw] = result.by_gateway.get(gw, 0) + 1
            if gw in allowed:
                result.ok += 1
            else:
                result.wrong_gateway += 1

    async def changer() -> None:
        while loop.time() < end:
            await change(result.changes)
            result.changes += 1
            await asyncio.sleep(args.change_every)

    changing = spawn(changer(), name="bench-rules-changer")
    try:
        await asyncio.gather(*(client() for _ in range(args.clients)))
        await changing
    finally:
        await cancel_and_wait(changing)
    after = await reload_counts(http, ps)
    result.reloads = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    return result


# -- the run ----------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def started_gateways(names: Sequence[str]) -> AsyncIterator[dict[str, FakeGateway]]:
    gws = {n: FakeGateway(n) for n in names}
    try:
        for g in gws.values():
            await g.start()
        yield gws
    finally:
        for g in gws.values():
            await g.stop()


async def run(args: argparse.Namespace, procs: Processes, workdir: Path) -> dict[str, Any]:
    latencies: list[Latency] = []
    storms: list[Storm] = []
    connector = aiohttp.TCPConnector(limit=args.clients + 8)
    timeout = aiohttp.ClientTimeout(total=10)
    async with (
        started_gateways([*LOAD_A, *LOAD_B, DECOY]) as gws,
        aiohttp.ClientSession(connector=connector, timeout=timeout) as http,
    ):
        urls = {n: g.url for n, g in gws.items()}
        # (a): one gateway per rule set, so the first answer from the other one is the proof.
        sets = {gw: rules_text({gw: urls[gw]}, [gw]) for gw in ("a1", "b1")}
        for method in METHODS:
            rules = RulesDir(workdir / method, configmap=method == "watch-configmap")
            rules.publish(sets["a1"])
            async with payswitch(procs, method, rules, watch=method != "admin") as ps:
                for _ in range(20):  # warm the connection pools on both sides
                    await pay(http, ps)
                print(f"reload-bench: (a) {method}: {args.reloads} reloads", file=sys.stderr)
                latencies.append(await time_to_serve(http, ps, method, rules, sets, args.reloads))
        # (b): the storm, through the watcher with each kind of write, and the admin API.
        variants = storm_variants(urls)
        for method in METHODS:
            rules = RulesDir(workdir / f"storm-{method}", configmap=method == "watch-configmap")
            rules.publish(variants[0])
            async with payswitch(procs, f"storm-{method}", rules, watch=method != "admin") as ps:

                async def change(i: int, rules: RulesDir = rules, ps: Payswitch = ps) -> None:
                    rules.publish(variants[(i + 1) % len(variants)])
                    if ps.watching:
                        return
                    async with http.post(ps.admin_url + "/admin/reload") as resp:
                        await resp.read()

                print(
                    f"reload-bench: (b) {method}: {args.clients} clients, "
                    f"{args.storm_seconds:g} s, a change every {args.change_every * 1000:g} ms",
                    file=sys.stderr,
                )
                storms.append(await storm(http, ps, method, change, args))
    return {
        "latency": [lat.summary() for lat in latencies],
        "latency_samples_ms": {
            lat.method: [round(v, 3) for v in lat.samples_ms] for lat in latencies
        },
        "storm": [asdict(s) for s in storms],
    }


def table(results: Mapping[str, Any]) -> str:
    rows = [
        "| (a) write → new rules serving | reloads | p50 ms | p99 ms | max ms | timed out | failed | wrong gw |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lat in results["latency"]:
        rows.append(
            f"| {lat['method']} | {lat['reloads']} | {lat['p50_ms']} | {lat['p99_ms']} | "
            f"{lat['max_ms']} | {lat['timed_out']} | {lat['failed']} | {lat['wrong_gateway']} |"
        )
    rows += [
        "",
        "| (b) reload storm under load | clients | s | changes | published | refused | sent | failed | wrong gw | req/s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for s in results["storm"]:
        rel = s["reloads"]
        rows.append(
            f"| {s['method']} | {s['clients']} | {s['seconds']:g} | {s['changes']} | "
            f"{rel.get('success', 0):.0f} | {rel.get('failure', 0):.0f} | {s['sent']} | "
            f"{s['failed']} | {s['wrong_gateway']} | {s['sent'] / s['seconds']:,.0f} |"
        )
    return "\n".join(rows)


def lost(results: Mapping[str, Any]) -> list[str]:
    """What makes the run fail: any lost or misrouted request, any reload that never served."""
    problems = []
    for lat in results["latency"]:
        for key in ("timed_out", "failed", "wrong_gateway"):
            if lat[key]:
                problems.append(f"(a) {lat['method']}: {key}={lat[key]}")
    for s in results["storm"]:
        for key in ("failed", "wrong_gateway"):
            if s[key]:
                problems.append(f"(b) {s['method']}: {key}={s[key]} {s['errors']}")
        if not s["reloads"].get("success") or not s["reloads"].get("failure"):
            problems.append(f"(b) {s['method']}: the storm did not both publish and refuse")
    return problems


def _unwind(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _unwind)
    # Nothing routes through payswitch between phases: a drain grace would only add idle time.
    os.environ.setdefault("PAYSWITCH_SHUTDOWN_GRACE", "0")
    cpus = os.sched_getaffinity(0)
    if LOAD_CORE in cpus and PROXY_CORE in cpus:
        os.sched_setaffinity(0, {LOAD_CORE})  # the load and the gateways stay off the proxy core
    started_at = datetime.datetime.now(datetime.UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    logs = OUT_DIR / f"logs-reload-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="payswitch-reload-") as tmp, Processes(logs) as procs:
        try:
            results = asyncio.run(run(args, procs, Path(tmp)))
        except BenchError as err:
            print(f"reload-bench: FAILED: {err}; logs in {logs}", file=sys.stderr)
            return 2
    results["meta"] = {
        "started_at": started_at.isoformat(),
        "wall_s": round(time.monotonic() - t0, 1),
        "args": vars(args),
        "proxy_core": PROXY_CORE,
        "load_core": LOAD_CORE,
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "python": platform.python_version(),
    }
    out = OUT_DIR / f"reload-{stamp}.json"
    out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(table(results))
    print(f"\nresults: {out}")
    problems = lost(results)
    if problems:
        print("reload-bench: LOST: " + "; ".join(problems) + f"; logs in {logs}", file=sys.stderr)
        return 1
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("reload-bench: interrupted; every started process was stopped", file=sys.stderr)
        sys.exit(130)
