"""CPU per request of payswitch builds, compared side by side on one upstream.

    .venv/bin/python bench/cpu.py NAME=TREE[:ARG,ARG...] ... [--rounds 5] [--duration 3]
    .venv/bin/python bench/cpu.py --callgrind NAME=TREE ... [--requests 3000]

TREE is a directory holding a `proxy` package (this checkout, or `git archive <rev> proxy
schemas` unpacked elsewhere); ARGs are extra `payswitch run` options, e.g.
`off=.:--access-log=off,--events=off`. `--floor` adds the aiohttp forwarder.

Two figures, both per request and both steadier than req/s on a shared machine:
- default: every build runs at once, pinned to the proxy core; wrk loads each in turn,
  round after round, and the process's user+system CPU time (/proc) is divided by the
  requests served. Other load moves all builds alike.
- `--callgrind`: user-space instructions under valgrind, counted only while `hey` sends
  a fixed number of POSTs (instrumentation toggled around them): the same from run to
  run within about 2%, whatever else the machine does. System calls are not counted.

Owns: starting the builds, the measurement loops and the printed table.
Must not: leave a process behind (everything goes through `procs.Processes`).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import hey, targets, wrk
from bench.procs import Processes, Started, children, free_port, wait_ok
from bench.targets import LOAD_CORE, PROXY_CORE, Context

_TICK = os.sysconf("SC_CLK_TCK")
_OK = re.compile(r"^\s*\[200\]\s+(\d+) responses", re.MULTILINE)


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of `pid` and its descendants so far."""
    pids, frontier = [pid], [pid]
    while frontier:
        kids = children(frontier.pop())
        pids += kids
        frontier += kids
    ticks = 0
    for p in pids:
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        ticks += int(fields[11]) + int(fields[12])
    return ticks / _TICK


def _argv(tree: str, rules: Path, port: int, admin: int, extra: list[str]) -> list[str]:
    boot = f"import sys; sys.path.insert(0, {tree!r}); from proxy.cli import main; sys.exit(main())"
    return [
        *(sys.executable, "-c", boot, "run", "--rules", str(rules), "--no-watch"),
        *("--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", *extra),
    ]


def _start(
    procs: Processes, name: str, spec: str, rules: Path, wrap: list[str]
) -> tuple[str, Started]:
    tree, _, extra = spec.partition(":")
    port, admin = free_port(), free_port()
    argv = wrap + _argv(
        str(Path(tree).resolve()), rules, port, admin, extra.split(",") * bool(extra)
    )
    started = procs.start(name, argv, core=PROXY_CORE)
    wait_ok(started, f"http://127.0.0.1:{admin}/readyz", timeout=600)
    return f"http://127.0.0.1:{port}{targets.PATH}", started


def wall(ctx: Context, builds: dict[str, str], args: argparse.Namespace) -> None:
    running: dict[str, tuple[str, Started]] = {}
    if args.floor:
        floor = targets.TARGETS[[t.name for t in targets.TARGETS].index("floor")].start(ctx)
        assert floor.started is not None
        running["floor"] = (floor.url, floor.started)
    rules = targets.write_rules(ctx.upstream_url, ctx.workdir / "rules")
    for name, spec in builds.items():
        running[name] = _start(ctx.procs, name, spec, rules, [])
    for url, _ in running.values():
        wrk.run(url, 2, core=LOAD_CORE)  # warm-up
    per: dict[str, list[tuple[float, float]]] = {name: [] for name in running}
    for i in range(args.rounds):
        for name, (url, started) in running.items():
            time.sleep(0.3)
            before = cpu_seconds(started.pid)
            run = wrk.run(url, args.duration, core=LOAD_CORE)
            us = (cpu_seconds(started.pid) - before) / max(run.requests, 1) * 1e6
            per[name].append((run.rps, us))
            print(f"round {i + 1} {name:12s} {run.rps:8.0f} req/s {us:6.1f} us/request", flush=True)
    print(f"\nmedian of {args.rounds} rounds of {args.duration:g} s")
    for name, rows in per.items():
        rps = statistics.median(r[0] for r in rows)
        us = statistics.median(r[1] for r in rows)
        print(
            f"{name:12s} {rps:8.0f} req/s {us:6.1f} us/request (least {min(r[1] for r in rows):.1f})"
        )


def callgrind(ctx: Context, builds: dict[str, str], args: argparse.Namespace) -> None:
    rules = targets.write_rules(ctx.upstream_url, ctx.workdir / "rules")
    body = wrk.post_body().decode()
    for name, spec in builds.items():
        out = ctx.workdir / f"callgrind.{name}"
        wrap = ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}"]
        url, started = _start(ctx.procs, name, spec, rules, wrap)
        load = [hey.binary() or "hey", "-c", "20", "-m", "POST", "-T", "application/json"]
        load += ["-d", body, url]
        pinned = ["taskset", "-c", str(LOAD_CORE)]
        subprocess.run(
            [*pinned, *load[:1], "-n", "500", *load[1:]], capture_output=True, check=True
        )
        control = ["callgrind_control", "-i"]
        subprocess.run([*control, "on", str(started.pid)], capture_output=True, check=True)
        done = subprocess.run(
            [*pinned, *load[:1], "-n", str(args.requests), *load[1:]],
            capture_output=True,
            text=True,
            check=True,
        )
        subprocess.run([*control, "off", str(started.pid)], capture_output=True, check=True)
        ctx.procs.stop(started)  # callgrind writes its totals on exit
        ok = _OK.search(done.stdout)
        total = max(
            (
                int(line.split()[1])
                for line in out.read_text().splitlines()
                if line.startswith(("summary:", "totals:"))
            ),
            default=0,
        )
        answered = int(ok.group(1)) if ok else 0
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            shutil.copy(out, args.keep / out.name)
        print(
            f"{name:12s} {total / args.requests / 1000:8.1f} k instructions/request "
            f"({answered} of {args.requests} answered 200)",
            flush=True,
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=TREE[:ARGS]")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--floor", action="store_true", help="also measure the forwarder")
    parser.add_argument("--callgrind", action="store_true", help="instructions, not CPU time")
    parser.add_argument("--requests", type=int, default=3000, help="POSTs counted (callgrind)")
    parser.add_argument(
        "--keep", type=Path, help="copy the callgrind files here (for callgrind_annotate)"
    )
    args = parser.parse_args(argv)
    builds = dict(spec.split("=", 1) for spec in args.builds)
    with tempfile.TemporaryDirectory(prefix="payswitch-cpu-") as tmp, Processes(Path(tmp)) as procs:
        _, upstream = targets.start_upstream(procs, Path(tmp))
        ctx = Context(procs=procs, workdir=Path(tmp), upstream_url=upstream)
        (callgrind if args.callgrind else wall)(ctx, builds, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
