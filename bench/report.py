"""Turning wrk runs into the figures the anchors are stated in, and the ratios we aim at.

Owns: the per-target summary (median of runs), whether a target served, the ratios, the
printed table and the JSON file.
Must not: run anything.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.hey import SteadyResult
from bench.wrk import WrkResult

# Share of failed requests above which a target is reported as not serving.
MAX_FAILED_SHARE = 0.5

# (name, numerator, denominator, goal); the goal is None where the ratio is context only.
RATIOS: tuple[tuple[str, str, str, float | None], ...] = (
    ("payswitch / floor", "payswitch", "floor", 1.25),
    ("payswitch, not compiled / floor", "payswitch-py", "floor", None),
    ("payswitch / Envoy", "payswitch", "envoy", None),
    ("payswitch / nginx proxy", "payswitch", "nginx", None),
    ("payswitch / direct", "payswitch", "direct", None),
    ("floor / direct", "floor", "direct", None),
)


@dataclass(slots=True, kw_only=True)
class TargetResult:
    name: str
    title: str
    runs: list[WrkResult] = field(default_factory=list)
    rss_mib: float | None = None  # after the measured runs
    idle_rss_mib: float | None = None  # started and smoke-checked, before any load
    peak_rss_mib: float | None = None  # high-water mark over the whole target's life
    steady: SteadyResult | None = None  # one client at a fixed rate
    # The same rate, every steady target timed in turn by one client, in microseconds:
    # median p50/p90/p99/p99.9 of the rounds, with the rounds and the failed exchanges.
    paired: dict[str, float] | None = None
    # What those medians were taken of, round by round, in the order they ran.
    steady_rounds: list[SteadyResult] = field(default_factory=list)
    paired_rounds: list[dict[str, float]] = field(default_factory=list)
    error: str | None = None

    def failure(self) -> str | None:
        """Why this target did not serve, or None if it did."""
        if self.error is not None:
            return self.error
        if not self.runs:
            return "no measured run"
        for run in self.runs:
            if run.requests == 0:
                return "no request completed"
            failed = max(run.non_2xx, run.socket_errors)
            if failed > run.requests * MAX_FAILED_SHARE:
                return (
                    f"{run.non_2xx} non-2xx/3xx and {run.socket_errors} socket errors "
                    f"out of {run.requests} requests"
                )
        return None

    def median(self, attr: str) -> float | None:
        if not self.runs:
            return None
        return float(statistics.median(float(getattr(run, attr)) for run in self.runs))

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "title": self.title,
            "ok": self.failure() is None,
            "error": self.failure(),
            "rps": self.median("rps"),
            "p50_ms": self.median("p50_ms"),
            "p99_ms": self.median("p99_ms"),
            "non_2xx": sum(run.non_2xx for run in self.runs),
            "socket_errors": sum(run.socket_errors for run in self.runs),
            "requests": sum(run.requests for run in self.runs),
            "rss_mib": self.rss_mib,
            "idle_rss_mib": self.idle_rss_mib,
            "peak_rss_mib": self.peak_rss_mib,
            "paired": self.paired,
            "paired_rounds": self.paired_rounds,
            "steady": self.steady.as_dict() if self.steady is not None else None,
            "steady_rounds": [r.as_dict() for r in self.steady_rounds],
            "runs": [run.as_dict() for run in self.runs],
        }


def ratios(results: dict[str, TargetResult]) -> dict[str, float | None]:
    out: dict[str, float | None] = {}
    for name, num, den, _goal in RATIOS:
        a, b = results.get(num), results.get(den)
        ok = a is not None and b is not None and a.failure() is None and b.failure() is None
        top = a.median("rps") if a is not None and ok else None
        bottom = b.median("rps") if b is not None and ok else None
        out[name] = top / bottom if top is not None and bottom else None
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: dict[str, TargetResult]) -> str:
    head = (
        f"{'target':<20} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'non-2xx':>8} "
        f"{'sock err':>8} {'idle RSS':>8} {'peak RSS':>8}"
    )
    lines = [head, "-" * len(head)]
    for result in results.values():
        d = result.as_dict()
        lines.append(
            f"{result.title:<20} {_fmt(d['rps'], ',.0f'):>9} {_fmt(d['p50_ms'], '.2f'):>8} "
            f"{_fmt(d['p99_ms'], '.2f'):>8} {d['non_2xx']:>8} {d['socket_errors']:>8} "
            f"{_fmt(result.idle_rss_mib, '.1f'):>8} {_fmt(result.peak_rss_mib, '.1f'):>8}"
        )
        failure = result.failure()
        if failure is not None:
            lines.append(f"  FAILED: {failure.splitlines()[0]}")
    lines.append("")
    got = ratios(results)
    for name, _num, _den, goal in RATIOS:
        value = got[name]
        verdict = ""
        if goal is not None and value is not None:
            verdict = f"  (goal >= {goal}: {'met' if value >= goal else 'NOT met'})"
        lines.append(f"{name:<24} {_fmt(value, '.2f'):>6}{verdict}")
    return "\n".join(lines)


def steady_table(results: dict[str, TargetResult], rate: int) -> str:
    """Latency at a steady rate, and what each proxy adds over the direct upstream."""
    direct = results.get("direct")
    base = direct.steady if direct is not None else None
    head = (
        f"{'target':<20} {'p50 ms':>8} {'p99 ms':>8} {'added p50':>10} {'added p99':>10} "
        f"{'non-2xx':>8} {'steal ms':>9}"
    )
    rounds = max((r.steady.rounds for r in results.values() if r.steady is not None), default=1)
    title = f"steady rate: one client, {rate} POST/s, no bursts"
    if rounds > 1:
        title += f"; median of {rounds} rounds, the targets taking turns"
    lines = [title, head, "-" * len(head)]
    for result in results.values():
        st = result.steady
        if st is None:
            continue
        added50 = st.p50_ms - base.p50_ms if base is not None else None
        added99 = st.p99_ms - base.p99_ms if base is not None else None
        if result.name == "direct":
            added50 = added99 = None
        lines.append(
            f"{result.title:<20} {st.p50_ms:>8.2f} {st.p99_ms:>8.2f} {_fmt(added50, '.2f'):>10} "
            f"{_fmt(added99, '.2f'):>10} {st.other:>8} {_fmt(st.steal_ms, '.0f'):>9}"
        )
    versus = _versus(
        results, lambda r: [x.p99_ms for x in r.steady_rounds], "ms", ".2f", "one after another"
    )
    if versus is not None:
        lines.append(versus)
    lines.append(
        "steal ms: CPU time the hypervisor took from this machine during the target's rounds"
        " (summed);\np99 at this rate is the slowest 1% of answers, and moves with it"
    )
    return "\n".join(lines)


PAIRED_FIGURES = ("p50_us", "p90_us", "p99_us", "p999_us")

#: The target whose steady-rate p99 is set against the anchor's round by round.
VERSUS = ("payswitch", "envoy")


def round_by_round(ours: list[float], theirs: list[float]) -> tuple[int, int, float] | None:
    """One figure of two targets per round, each round a stretch of the host both ran
    through: (rounds where ours was at or below theirs, rounds compared, median of ours
    minus theirs). None unless both ran the same rounds.

    A p99 at a steady rate moves from round to round with the host by more than the
    proxies differ; set side by side in each round, the host's share mostly cancels, and
    how many rounds one target wins says more than the two medians do."""
    if not ours or len(ours) != len(theirs):
        return None
    diffs = [a - b for a, b in zip(ours, theirs, strict=True)]
    return sum(d <= 0 for d in diffs), len(diffs), float(statistics.median(diffs))


def versus_line(
    ours: str, theirs: str, got: tuple[int, int, float] | None, unit: str, spec: str, how: str
) -> str | None:
    """`round_by_round`'s answer in two lines, or None; `how` says how each round's
    targets shared the host."""
    if got is None:
        return None
    at, n, med = got
    return (
        f"{ours} p99 against {theirs}'s, round by round: at or below it in {at} of {n},\n"
        f"  median difference {format(med, '+' + spec)} {unit} (each round's targets ran {how})"
    )


def _versus(
    results: dict[str, TargetResult],
    figure: Callable[[TargetResult], list[float]],
    unit: str,
    spec: str,
    how: str,
) -> str | None:
    a, b = (results.get(name) for name in VERSUS)
    if a is None or b is None:
        return None
    return versus_line(a.title, b.title, round_by_round(figure(a), figure(b)), unit, spec, how)


def paired_median(rounds: list[dict[str, float]], steal_ms: float | None) -> dict[str, float]:
    """One target's paired rounds as one result: each figure's median, failures summed,
    and the host's steal during the rounds (every target's; absent when unknown)."""
    if not rounds:
        raise ValueError("no paired round to take the median of")
    out = {f: float(statistics.median(r[f] for r in rounds)) for f in PAIRED_FIGURES}
    out["rounds"] = len(rounds)
    out["failed"] = sum(r.get("failed", 0) for r in rounds)
    if steal_ms is not None:
        out["steal_ms"] = steal_ms
    return out


def paired_table(results: dict[str, TargetResult], rate: int) -> str:
    """The steady rate timed in turns: every target through the same seconds of the host."""
    direct = results.get("direct")
    base = direct.paired if direct is not None else None
    rows = [r for r in results.values() if r.paired is not None]
    rounds = max((int(r.paired["rounds"]) for r in rows if r.paired), default=1)
    steal_ms = next((r.paired.get("steal_ms") for r in rows if r.paired), None)
    head = (
        f"{'target':<20} {'p50 us':>7} {'p90 us':>7} {'p99 us':>7} {'p99.9 us':>9}"
        f" {'added p50':>10} {'added p99':>10} {'failed':>7}"
    )
    lines = [
        f"steady rate, in turns: one client, {rate} POST/s to each target in turn;"
        f" median of {rounds} round(s)",
        head,
        "-" * len(head),
    ]
    for result in rows:
        pr = result.paired
        assert pr is not None
        added50 = added99 = None
        if base is not None and result.name != "direct":
            added50, added99 = pr["p50_us"] - base["p50_us"], pr["p99_us"] - base["p99_us"]
        lines.append(
            f"{result.title:<20} {pr['p50_us']:>7.0f} {pr['p90_us']:>7.0f} {pr['p99_us']:>7.0f}"
            f" {pr['p999_us']:>9.0f} {_fmt(added50, '.0f'):>10} {_fmt(added99, '.0f'):>10}"
            f" {pr['failed']:>7.0f}"
        )
    versus = _versus(
        results,
        lambda r: [x["p99_us"] for x in r.paired_rounds],
        "us",
        ".0f",
        "through the same seconds",
    )
    if versus is not None:
        lines.append(versus)
    lines.append(
        "a stall of the host lands on every target alike here"
        + ("" if steal_ms is None else f" (host steal during these rounds: {steal_ms:.0f} ms)")
        + ";\nthe proxy core serves all of them, so compare within this table only"
    )
    return "\n".join(lines)


def write_json(path: Path, meta: dict[str, Any], results: dict[str, TargetResult]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {
        **meta,
        "targets": {name: result.as_dict() for name, result in results.items()},
        "ratios": ratios(results),
    }
    path.write_text(json.dumps(doc, indent=2) + "\n", encoding="utf-8")
