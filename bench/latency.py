"""Latency added at a steady rate, in microseconds: payswitch builds beside direct and Envoy.

    .venv/bin/python bench/latency.py NAME=TREE[:ARG,ARG...] ... [--rounds 8] [--seconds 8]
        [--rate 400] [--no-envoy] [--paired] [--histogram]

TREE and ARGs as in bench/cpu.py (e.g. `new=.build/native old=/tmp/old-native
off=.build/native:--access-log=off,--events=off`). Every target runs side by side; each
round measures every target once with bench/fixed_rate.py (one connection, a fixed rate,
microsecond clock), in an order that turns each round, and the table shows each target's
median round and what it adds over the direct upstream. `make bench` keeps hey for its
steady-rate table; this is the finer look for comparing two builds.

`--paired` times every target in the same seconds: one client sends to each in turn, each
at the rate on its own connection (bench/fixed_rate.py, several URLs). A stall of the host
then lands on all of them alike instead of on whichever was measured when it came, which
on a virtual machine decides p99 more than either proxy does. Each target still sees the
rate, and the proxy core serves them all: compare within one table, not across modes.

`--histogram` adds each target's latencies per 100 us, every round together. On a virtual
machine whose idle cores halt without polling first, a busy host gives them two humps, the
second some hundreds of microseconds later: exchanges that waited for the host to wake the
proxy's core. With an idle-priority busy loop keeping that core awake
(`chrt -i 0 taskset -c 0 ...`), the second hump goes. How many exchanges land in it
decides p90 and p99 more than either proxy does.

Owns: the rounds, the printed table and histograms. Must not: leave a process behind.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import cpu, fixed_rate, host, report, targets
from bench.procs import Processes
from bench.run import turned
from bench.targets import LOAD_CORE, Context

FIGURES = report.PAIRED_FIGURES


def table(per: dict[str, list[dict[str, float]]], base: str = "direct") -> list[str]:
    """One line per target: the median round's figures and what they add over `base`."""
    med = {name: report.paired_median(rounds, None) for name, rounds in per.items()}
    ref = med.get(base)
    head = f"{'target':14s}" + "".join(f"{f.removesuffix('_us'):>8s}" for f in FIGURES)
    lines = [head + "   added p50/p90/p99/p99.9 (us)"]
    for name, m in med.items():
        row = f"{name:14s}" + "".join(f"{m[f]:8.0f}" for f in FIGURES)
        if ref is not None and name != base:
            row += "   " + " / ".join(f"{m[f] - ref[f]:.0f}" for f in FIGURES)
        lines.append(row)
    return lines


def versus_lines(per: dict[str, list[dict[str, float]]], paired: bool) -> list[str]:
    """Each build's p99 against Envoy's, round by round (`report.round_by_round`)."""
    anchor = per.get("envoy")
    if anchor is None:
        return []
    how = "through the same seconds" if paired else "one after another"
    lines = []
    for name, rounds in per.items():
        if name in ("direct", "envoy"):
            continue
        got = report.round_by_round([r["p99_us"] for r in rounds], [r["p99_us"] for r in anchor])
        line = report.versus_line(name, "envoy", got, "us", ".0f", how)
        if line is not None:
            lines.extend(line.splitlines())
    return lines


def steal_line(per: dict[str, list[dict[str, float]]]) -> str | None:
    """The host's steal during each target's rounds, summed (bench/host.py says why it
    matters); None when it could not be read for every round."""
    totals = {n: host.summed(r.get("steal_ms") for r in rounds) for n, rounds in per.items()}
    if None in totals.values():
        return None
    each = ", ".join(f"{n} {total:.0f}" for n, total in totals.items())
    return f"host steal during each target's rounds, ms: {each}"


def histogram_lines(hists: dict[str, list[int]]) -> list[str]:
    """Each target's exchanges per 100 us of latency, every round together: one row per
    target, one column per bin, headed by where the bin starts (ms); the last column holds
    everything slower. Two humps mean the host, not the proxy, decides the tail."""
    if not hists:
        return []
    width = max(len(b) for b in hists.values())
    step = fixed_rate.BIN_US / 1000
    head = f"{'ms':14s}" + "".join(f"{i * step:>6.1f}" for i in range(width - 1)) + "    >="
    lines = [head]
    for name, bins in hists.items():
        lines.append(f"{name:14s}" + "".join(f"{n:6d}" for n in bins))
    return lines


def host_line(per: dict[str, list[dict[str, float]]]) -> str | None:
    """Paired rounds: the host's steal during them, which every target shared."""
    first = next(iter(per.values()), [])
    total = host.summed(r.get("steal_ms") for r in first)
    return (
        None if total is None else f"host steal during the rounds, ms (every target's): {total:.0f}"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("builds", nargs="+", metavar="NAME=TREE[:ARGS]")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--rate", type=float, default=400.0)
    parser.add_argument("--no-envoy", action="store_true", help="leave Envoy out")
    parser.add_argument(
        "--paired", action="store_true", help="time every target in the same seconds, in turn"
    )
    parser.add_argument(
        "--histogram", action="store_true", help="also print each target's latency histogram"
    )
    args = parser.parse_args(argv)
    builds = dict(spec.split("=", 1) for spec in args.builds)
    with (
        tempfile.TemporaryDirectory(prefix="payswitch-latency-") as tmp,
        Processes(Path(tmp)) as procs,
    ):
        _, upstream = targets.start_upstream(procs, Path(tmp))
        ctx = Context(procs=procs, workdir=Path(tmp), upstream_url=upstream)
        anchors = {t.name: t for t in targets.TARGETS}
        urls = {"direct": anchors["direct"].start(ctx).url}
        if not args.no_envoy:
            urls["envoy"] = anchors["envoy"].start(ctx).url
        rules = targets.write_rules(upstream, Path(tmp) / "rules")
        for name, spec in builds.items():
            urls[name], _ = cpu._start(procs, name, spec, rules, [])
        per: dict[str, list[dict[str, float]]] = {name: [] for name in urls}
        hists: dict[str, list[int]] = {}
        for i in range(args.rounds):
            order = turned(list(urls), i)
            for group in [order] if args.paired else [[name] for name in order]:
                got = fixed_rate.measure_turns(
                    {n: urls[n] for n in group},
                    args.rate,
                    args.seconds,
                    core=LOAD_CORE,
                    hists=hists,
                )
                for name in group:
                    per[name].append(got[name])
            shown = ", ".join(
                f"{n} {r[-1]['p50_us']:.0f}/{r[-1]['p99_us']:.0f}" for n, r in per.items()
            )
            print(f"round {i + 1} (p50/p99 us): {shown}", flush=True)
    how = "each target, all in turn" if args.paired else "one connection"
    print(f"\n{args.rate:g} POST/s, {how}; median of {args.rounds} rounds of {args.seconds:g} s")
    print("\n".join(table(per) + versus_lines(per, args.paired)))
    stolen = steal_line(per) if not args.paired else host_line(per)
    if stolen is not None:
        print(stolen)
    if args.histogram:
        print(f"\nexchanges per {fixed_rate.BIN_US} us of latency, every round")
        print("\n".join(histogram_lines(hists)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
