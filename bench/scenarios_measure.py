"""What a failover scenario's run measured: the figures of one row.

Owns: turning a run's client samples, the gateways' logs, the providers' ledger and the
timeline of flags and events into the row's figures: payswitch's and g1's (`measure`), and
those of the failing gateways together (`measure_faulty`).
Must not: run anything or judge the figures; bench/scenarios.py does both.
"""

from __future__ import annotations

from typing import Any

from bench.scenarios_compare import attempts_after, full_share_after
from bench.scenarios_env import PER_TRY, Mark, Timeline, World
from bench.scenarios_faults import Scenario
from bench.scenarios_load import Sample

#: Flags under which g1 gets no new requests.
OUT_FLAGS = ("ejected", "active_failed", "throttled")


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
