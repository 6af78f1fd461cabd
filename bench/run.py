"""Throughput per proxy core: payswitch side by side with its anchors (shared/ANCHORS.md).

Owns: the order of a bench run: tools, the upstream, each target in turn (start, smoke
check, warm-up, measured runs, memory, stop), the report, and the exit status (non-zero
when a target did not serve).
Must not: leave a process behind, whatever happens: every start goes through
`procs.Processes`, closed in a finally, and SIGTERM/SIGHUP unwind like Ctrl-C.

Usage: .venv/bin/python bench/run.py [--quick] [--duration S] [--runs N] [--only NAME...]
       [--payswitch-arg=ARG ...]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

if __package__ in (None, ""):
    # Run as a script: make `bench` importable as a package, and stop bench/ itself from
    # shadowing top-level modules.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import envoy, fixed_rate, hey, host, nginx, report, targets, tools, wrk
from bench.procs import BenchError, Processes, http, tree_rss_mib
from bench.report import TargetResult
from bench.targets import LOAD_CORE, Context, Running, Target

OUT_DIR = targets.BENCH_DIR / "out"
SETTLE = 0.5  # seconds between runs, so one run's closing connections do not skew the next
#: Targets also measured at a steady rate (one client, no bursts): the latency each adds.
STEADY = ("direct", "envoy", "floor", "payswitch")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    names = [t.name for t in targets.TARGETS]
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=10.0, help="seconds per run (10)")
    parser.add_argument("--runs", type=int, default=3, help="runs per target; median kept (3)")
    parser.add_argument("--warmup", type=float, default=None, help="seconds (2; 1 with --quick)")
    parser.add_argument("--quick", action="store_true", help="1 run of 5 s per target")
    parser.add_argument(
        "--payswitch-arg",
        action="append",
        default=[],
        metavar="ARG",
        help="extra `payswitch run` option, repeatable (e.g. --payswitch-arg=--access-log=off)",
    )
    parser.add_argument("--only", nargs="+", choices=names, help="a subset of targets")
    parser.add_argument(
        "--steady",
        type=float,
        default=None,
        help="seconds of each steady-rate round (5; 3 --quick; 0 skips)",
    )
    parser.add_argument(
        "--steady-rounds",
        type=int,
        default=None,
        help="steady-rate rounds, each measuring every target once; median kept (5; 1 --quick)",
    )
    parser.add_argument(
        "--paired-rounds",
        type=int,
        default=None,
        help="rounds timing the steady targets in turn, --steady s each (5; 1 --quick; 0 skips)",
    )
    args = parser.parse_args(argv)
    if args.paired_rounds is None:
        args.paired_rounds = 1 if args.quick else 5
    if args.paired_rounds < 0:
        parser.error("--paired-rounds must be >= 0")
    if args.quick:
        args.duration, args.runs = 5.0, 1
    if args.warmup is None:
        args.warmup = 1.0 if args.quick else 2.0
    if args.steady is None:
        args.steady = 3.0 if args.quick else 5.0
    if args.steady_rounds is None:
        args.steady_rounds = 1 if args.quick else 5
    if args.duration < 1 or args.runs < 1 or args.warmup < 0:
        parser.error("--duration must be >= 1, --runs >= 1, --warmup >= 0")
    if args.steady_rounds < 1 or 0 < args.steady < 1:
        parser.error("--steady-rounds must be >= 1, --steady 0 or >= 1")
    args.only = args.only or names
    return args


def smoke(url: str, body: bytes) -> None:
    """One POST before the load: a target that answers, but wrongly, is not measured."""
    resp = http("POST", url, body, timeout=5.0)
    if resp.status != 200 or b"pay_123" not in resp.body:
        raise BenchError(f"POST {url} answered {resp.status}: {resp.body[:200]!r}")


T = TypeVar("T")


def turned(names: list[str], round_no: int) -> list[str]:
    """`names` starting at a different one each round, so no target always goes first."""
    k = round_no % len(names) if names else 0
    return names[k:] + names[:k]


_FAILURES = (
    BenchError,
    wrk.WrkOutputError,
    hey.HeyOutputError,
    OSError,
    subprocess.SubprocessError,
)


def measure(
    chosen: list[Target], ctx: Context, args: argparse.Namespace, body: bytes
) -> dict[str, TargetResult]:
    """Every chosen target, started together and measured in turns.

    A shared machine's speed drifts by tens of percent over minutes: measured one after
    the other, minutes apart, targets would be compared across that drift. So each target
    is started (smoke-checked, idle RSS read), then the steady-rate rounds run, then the
    saturation runs, and each round measures every target once, the order turning each
    round; a target's figures are the median of its rounds. The steady rate comes first,
    so nothing a saturating run leaves behind colours it.
    """
    results = {t.name: TargetResult(name=t.name, title=t.title) for t in chosen}
    running: dict[str, Running] = {}

    def failed(name: str, err: BaseException) -> None:
        results[name].error = str(err)
        print(f"bench: {results[name].title}: FAILED: {err}", file=sys.stderr, flush=True)
        gone = running.pop(name, None)
        if gone is not None and gone.started is not None:
            ctx.procs.stop(gone.started)

    def in_turns(
        names: list[str],
        rounds: int,
        run_one: Callable[[str], T],
        said: Callable[[int, T], str],
    ) -> dict[str, list[T]]:
        """`rounds` rounds, each running every one of `names` still running once, the
        order turning each round; what each gave, by name."""
        got: dict[str, list[T]] = {}
        for i in range(rounds):
            for name in turned(names, i):
                if name not in running:
                    continue
                time.sleep(SETTLE)
                try:
                    one = run_one(running[name].url)
                except _FAILURES as err:
                    failed(name, err)
                    continue
                got.setdefault(name, []).append(one)
                line = f"bench: {results[name].title}: {said(i, one)}"
                print(line, file=sys.stderr, flush=True)
        return got

    def paired(names: list[str], seconds: float, rounds: int) -> None:
        """The steady targets again, timed in turn by one client: a stall of the host
        lands on all of them alike. A failed round is reported and leaves the table out."""
        got: dict[str, list[dict[str, float]]] = {}
        steal: list[float | None] = []
        for i in range(rounds):
            order = [n for n in turned(names, i) if n in running]
            if len(order) < 2:
                return
            time.sleep(SETTLE)
            try:
                one = fixed_rate.measure_turns(
                    {n: running[n].url for n in order}, hey.RATE, seconds, core=LOAD_CORE
                )
            except _FAILURES as err:
                print(f"bench: steady rate in turns: FAILED: {err}", file=sys.stderr, flush=True)
                return
            steal.append(one[order[0]].get("steal_ms"))
            for name in order:
                got.setdefault(name, []).append(one[name])
            shown = ", ".join(f"{n} {one[n]['p50_us']:.0f}/{one[n]['p99_us']:.0f}" for n in order)
            print(
                f"bench: steady rate in turns, round {i + 1}/{rounds} (p50/p99 us): {shown}",
                file=sys.stderr,
                flush=True,
            )
        stolen = host.summed(steal)
        for name, figures in got.items():
            results[name].paired = report.paired_median(figures, stolen)
            results[name].paired_rounds = figures

    try:
        for target in chosen:
            result = results[target.name]
            print(f"bench: {target.title}: starting", file=sys.stderr, flush=True)
            try:
                started = running[target.name] = target.start(ctx)
                smoke(started.url, body)
                if started.started is not None:
                    result.idle_rss_mib = tree_rss_mib(
                        started.started.pid, include_root=started.rss_root
                    )
            except _FAILURES as err:
                failed(target.name, err)
        steady = [n for n in running if n in STEADY] if args.steady > 0 else []
        rounds = in_turns(
            steady,
            args.steady_rounds,
            lambda url: hey.run(url, body, args.steady, core=LOAD_CORE),
            lambda i, one: (
                f"steady {hey.RATE}/s, round {i + 1}/{args.steady_rounds}: "
                f"p50 {one.p50_ms:.2f} ms p99 {one.p99_ms:.2f} ms"
                + ("" if one.steal_ms is None else f", host steal {one.steal_ms:.0f} ms")
            ),
        )
        for name, steadies in rounds.items():
            results[name].steady = hey.median_of(steadies)
            results[name].steady_rounds = steadies
        paired(steady, args.steady, args.paired_rounds)
        for name in list(running):
            if args.warmup > 0:
                try:
                    wrk.run(running[name].url, args.warmup, core=LOAD_CORE)
                except _FAILURES as err:
                    failed(name, err)
        saturated = in_turns(
            list(running),
            args.runs,
            lambda url: wrk.run(url, args.duration, core=LOAD_CORE),
            lambda i, run: (
                f"run {i + 1}/{args.runs}: {run.rps:,.0f} req/s "
                f"p50 {run.p50_ms:.2f} ms p99 {run.p99_ms:.2f} ms"
            ),
        )
        for name, runs in saturated.items():
            results[name].runs = runs
        for name, started in running.items():
            if started.started is not None:
                pid, root = started.started.pid, started.rss_root
                results[name].rss_mib = tree_rss_mib(pid, include_root=root)
                results[name].peak_rss_mib = tree_rss_mib(pid, include_root=root, peak=True)
    finally:
        for started in running.values():
            if started.started is not None:
                ctx.procs.stop(started.started)
    return results


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (done.stdout + done.stderr).strip().splitlines()[0] if done.stdout + done.stderr else ""


def meta(
    args: argparse.Namespace, started_at: datetime.datetime, beside: list[str] | None = None
) -> dict[str, Any]:
    return {
        "started_at": started_at.isoformat(),
        "beside": beside or [],
        "duration_s": args.duration,
        "runs": args.runs,
        "warmup_s": args.warmup,
        "payswitch_args": args.payswitch_arg,
        "wrk": {"threads": wrk.THREADS, "connections": wrk.CONNECTIONS, "core": LOAD_CORE},
        "proxy_core": targets.PROXY_CORE,
        "payswitch_cores": targets.payswitch_cores(args.payswitch_arg),
        "body_bytes": len(wrk.post_body()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "versions": {
            "python": platform.python_version(),
            "nginx": _version([nginx.binary() or "nginx", "-v"]),
            "wrk": _version([wrk.binary() or "wrk", "-v"]),
            "envoy": _version([envoy.binary() or "envoy", "--version"]),
            "git": _version(["git", "-C", str(targets.REPO), "rev-parse", "--short", "HEAD"]),
        },
    }


def _unwind(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, _unwind)
    tools.ensure()
    beside = host.neighbours()
    warning = host.neighbours_line(beside)
    if warning is not None:
        print(f"bench: {warning}", file=sys.stderr, flush=True)
    body = wrk.post_body()
    started_at = datetime.datetime.now(datetime.UTC)
    stamp = started_at.strftime("%Y%m%dT%H%M%SZ")
    # Process logs outlive the temp dir: they are what explains a target that failed.
    logs = OUT_DIR / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    results: dict[str, TargetResult] = {}
    with tempfile.TemporaryDirectory(prefix="payswitch-bench-") as tmp, Processes(logs) as procs:
        try:
            _, upstream_url = targets.start_upstream(procs, Path(tmp))
        except BenchError as err:
            print(f"bench: upstream: FAILED: {err}", file=sys.stderr)
            return 2
        ctx = Context(
            procs=procs,
            workdir=Path(tmp),
            upstream_url=upstream_url,
            payswitch_args=tuple(args.payswitch_arg),
        )
        cores = targets.payswitch_cores(args.payswitch_arg)
        if "," in cores:
            print(
                f"bench: payswitch workers on cores {cores}: wrk and the upstream share core "
                f"{LOAD_CORE} with one of them (the other targets keep core {targets.PROXY_CORE})",
                file=sys.stderr,
                flush=True,
            )
        chosen = [t for t in targets.TARGETS if t.name in args.only]
        results = measure(chosen, ctx, args, body)
    out = OUT_DIR / f"results-{stamp}.json"
    report.write_json(out, meta(args, started_at, beside), results)
    print()
    print(
        f"{args.runs} round(s) x {args.duration:g} s per target, the targets taking turns, median; "
        f"wrk -t{wrk.THREADS} -c{wrk.CONNECTIONS}, {len(body)}-byte POST {targets.PATH}"
    )
    print(report.table(results))
    if any(r.steady is not None for r in results.values()):
        print()
        print(report.steady_table(results, hey.RATE))
    if any(r.paired is not None for r in results.values()):
        print()
        print(report.paired_table(results, hey.RATE))
    if warning is not None:
        print(f"\nnote: {warning}")
    print(f"\nresults: {out}")
    failed = [name for name, result in results.items() if result.failure() is not None]
    if failed:
        print(f"bench: did not serve: {', '.join(failed)}; logs in {logs}", file=sys.stderr)
        return 1
    # payswitch logs events per request (tens of MB a run); kept only to explain a failure.
    shutil.rmtree(logs, ignore_errors=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("bench: interrupted; every started process was stopped", file=sys.stderr)
        sys.exit(130)
