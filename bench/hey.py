"""The steady-rate load: one hey worker at a fixed rate, and the latency it reports.

Owns: the hey command line (one connection, `RATE` POSTs a second, no bursts), running it
bounded in time, parsing its latency distribution (p50, p99) and status counts, and the
median of several rounds.
Must not: decide what the figures mean; the runner compares them with the direct upstream.
"""

from __future__ import annotations

import re
import shutil
import statistics
from dataclasses import asdict, dataclass, replace

from bench import host

RATE = 400  # requests a second, from one worker on one keep-alive connection

_PCT = re.compile(r"^\s*(50|99)%+ in ([\d.]+) secs", re.MULTILINE)
_STATUS = re.compile(r"^\s*\[(\d{3})\]\s+(\d+) responses", re.MULTILINE)
_ERRORS = re.compile(r"^Error distribution:\n((?:\s+\[\d+\].*\n?)+)", re.MULTILINE)


class HeyOutputError(ValueError):
    """hey printed something this parser does not understand, or failed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class SteadyResult:
    p50_ms: float
    p99_ms: float
    ok: int  # 2xx answers
    other: int  # any other status, and errors
    rounds: int = 1  # runs these figures are the median of
    steal_ms: float | None = None  # CPU the host took while measured (summed); None: unknown

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def median_of(runs: list[SteadyResult]) -> SteadyResult:
    """One target's rounds as one result: the median p50 and p99, every answer counted."""
    if not runs:
        raise ValueError("no steady run to take the median of")
    return SteadyResult(
        p50_ms=statistics.median(r.p50_ms for r in runs),
        p99_ms=statistics.median(r.p99_ms for r in runs),
        ok=sum(r.ok for r in runs),
        other=sum(r.other for r in runs),
        rounds=len(runs),
        steal_ms=host.summed(r.steal_ms for r in runs),
    )


def binary() -> str | None:
    return shutil.which("hey")


def parse(text: str) -> SteadyResult:
    pct = {p: float(v) * 1000 for p, v in _PCT.findall(text)}
    if set(pct) != {"50", "99"}:
        raise HeyOutputError(f"cannot parse hey output:\n{text}")
    ok = other = 0
    for status, count in _STATUS.findall(text):
        if status.startswith("2"):
            ok += int(count)
        else:
            other += int(count)
    errors = _ERRORS.search(text)
    if errors:
        other += sum(int(n) for n in re.findall(r"\[(\d+)\]", errors.group(1)))
    return SteadyResult(p50_ms=pct["50"], p99_ms=pct["99"], ok=ok, other=other)


def run(url: str, body: bytes, seconds: float, *, core: int, rate: int = RATE) -> SteadyResult:
    argv = ["taskset", "-c", str(core), binary() or "hey", "-z", f"{max(1, round(seconds))}s"]
    argv += ["-c", "1", "-q", str(rate), "-m", "POST", "-T", "application/json"]
    argv += ["-d", body.decode(), url]
    done, stolen = host.run_counting_steal(
        argv, capture_output=True, timeout=seconds + 30, start_new_session=True
    )
    if done.returncode != 0:
        raise HeyOutputError(f"hey exited {done.returncode}: {done.stderr.strip()}")
    return replace(parse(done.stdout), steal_ms=stolen)
