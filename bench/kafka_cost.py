"""What the Kafka sink costs a payment: payswitch's own CPU time per request, sink on vs off.

Owns: one measurement, interleaved off/on/off/on... so a neighbour's load lands on both:
payswitch pinned to the proxy core, nginx upstream and wrk on the other, the broker where
the system puts it; for each run the requests wrk completed and the CPU seconds the
payswitch process used (utime + stime from /proc), as microseconds of CPU per request.
CPU per request is far steadier than requests per second on a shared machine: a busy
neighbour slows both, but does not make a request cost more of payswitch's own CPU.
Must not: start the broker (.ci/kafka/start does) or judge the result.

With the shipped defaults (access log and events on stdout) on both sides, the difference
is what the Kafka sink itself adds; `--quiet` turns every other output off on both sides,
so the difference is the sink plus building the events it sends.

payswitch is the native build, as the image ships it (`make native` first); `--python`
measures the sources instead.

Usage: .venv/bin/python bench/kafka_cost.py [--rounds 3] [--duration 8] [--quiet] [--python]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import wrk
from bench.procs import Processes, free_port, wait_ok
from bench.targets import (
    LOAD_CORE,
    PATH,
    PROXY_CORE,
    native_env,
    payswitch_binary,
    start_upstream,
    write_rules,
)

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def one(
    procs: Processes, rules: Path, extra: list[str], seconds: float, env: dict[str, str]
) -> tuple[float, float]:
    """(requests per second, CPU microseconds per request) of one payswitch run."""
    port, admin = free_port(), free_port()
    argv = [str(payswitch_binary()), "run", "--rules", str(rules),
            "--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}", *extra]  # fmt: skip
    started = procs.start("payswitch", argv, core=PROXY_CORE, env=env)
    try:
        wait_ok(started, f"http://127.0.0.1:{admin}/readyz", timeout=30)
        url = f"http://127.0.0.1:{port}{PATH}"
        wrk.run(url, 2.0, core=LOAD_CORE)  # warm-up
        before = cpu_seconds(started.pid)
        result = wrk.run(url, seconds, core=LOAD_CORE)
        used = cpu_seconds(started.pid) - before
        return result.rps, used / result.requests * 1e6
    finally:
        procs.stop(started)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=8.0)
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--quiet", action="store_true", help="access log and stdout events off")
    ap.add_argument("--python", action="store_true", help="the sources, not the native build")
    args = ap.parse_args()
    env = {} if args.python else native_env()
    work = Path(tempfile.mkdtemp(prefix="payswitch-kafka-cost-"))
    off = ["--events", "off", "--access-log", "off"] if args.quiet else []
    on = [*off, "--kafka-bootstrap", args.bootstrap, "--kafka-spill", str(work / "spill.jsonl"),
          "--kafka-control", "off"]  # fmt: skip
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    (work / "logs").mkdir()
    with Processes(work / "logs") as procs:
        _, upstream = start_upstream(procs, work)
        rules = write_rules(upstream, work / "rules")
        for _ in range(args.rounds):
            for name, extra in (("off", off), ("on", on)):
                rps, cpu = one(procs, rules, extra, args.duration, env)
                results[name].append((rps, cpu))
                print(
                    f"kafka sink {name:>3}: {rps:8,.0f} req/s  {cpu:6.1f} us CPU/request",
                    flush=True,
                )
                time.sleep(0.5)
    med = {k: (statistics.median(r for r, _ in v), statistics.median(c for _, c in v))
           for k, v in results.items()}  # fmt: skip
    print(
        f"median: off {med['off'][0]:,.0f} req/s {med['off'][1]:.1f} us/req; "
        f"on {med['on'][0]:,.0f} req/s {med['on'][1]:.1f} us/req; "
        f"CPU per request +{(med['on'][1] / med['off'][1] - 1) * 100:.1f}%, "
        f"throughput {(med['on'][0] / med['off'][0] - 1) * 100:+.1f}%"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
