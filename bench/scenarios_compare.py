"""payswitch's failover figures beside Envoy's, one row per scenario.

Owns: the side-by-side table printed at the end of `make scenarios`: each scenario's
payswitch cell from this run, and Envoy's — measured in this run when `--envoy` ran it
(bench/scenarios_envoy.py), otherwise the figures of shared/ANCHORS.md (Envoy 1.40 on a
2-core machine of the same kind), marked as such.
Must not: run anything or judge anything; the expectations live in bench/scenarios.py.
"""

from __future__ import annotations

from typing import Any

#: g1's share of traffic when all three gateways are healthy and equally weighted.
FULL_SHARE = 1 / 3
#: "Full traffic" again: a 1 s window in which g1 took at least this much of its share.
FULL_FRACTION = 0.9


def full_share_after(arrivals: list[tuple[float, str]], since: float) -> float | None:
    """Seconds from `since` to the start of the first 1 s window in which g1 took at least
    FULL_FRACTION of its share of the requests reaching the gateways; `arrivals` are
    (scenario time, gateway) in time order."""
    after = [(t, name) for t, name in arrivals if t >= since]
    end = after[-1][0] if after else since
    start = since
    while start + 1.0 <= end:
        window = [name for t, name in after if start <= t < start + 1.0]
        if window and window.count("g1") / len(window) >= FULL_FRACTION * FULL_SHARE:
            return round(start - since, 2)
        start += 0.1
    return None


def attempts_after(
    counts: list[tuple[float, dict[str, int]]], names: list[str], since: float
) -> tuple[int, float | None]:
    """Attempts on `names` counted after `since` in the sampled counters, and the time of
    the last sample that saw one (None: none)."""
    total, last = 0, None
    prev: dict[str, int] | None = None
    for t, c in counts:
        if prev is not None and t > since:
            more = sum(max(0, c.get(n, 0) - prev.get(n, 0)) for n in names)
            if more:
                total += more
                last = t
        prev = c
    return total, last


def envoy_cell(
    key: str, figures: dict[str, Any], counts: list[tuple[float, dict[str, int]]], faulty: list[str]
) -> str:
    base = (
        f"{figures['errors']}/{figures['slow']}/{figures['charged_twice']}"
        f"/{figures['charged_told_failed']}"
    )
    fault = figures["fault_at"]
    if figures["recovered_at"] is not None and key == "f":
        full = full_share_after(figures["arrivals"], figures["recovered_at"])
        return f"{base}; full share after +{full} s"
    if key == "g":
        return f"{base} ({figures['g1_hits_during_fault']} requests hit g1)"
    if len(faulty) > 1:
        n, last = attempts_after(counts, faulty, fault)
        when = "-" if last is None else f"+{last - fault:.2f} s"
        return f"{base}; failing gateways tried {n} times after the fault, the last at {when}"
    return base


#: Envoy 1.40 in shared/ANCHORS.md, same setup (3 gateways, 50 POST/s, 30 s, fault at 5 s):
#: client failures / slower than 300 ms / charged twice / charged while told failed, or
#: what that table gives for the row.
ANCHOR_ENVOY: dict[str, str] = {
    "a": "0/0/0/0",
    "b": "0/10/10/0",
    "c": "0/44/43/0",
    "d": "0/0/0/0",
    "e": "13 failures (429)",
    "f": "full share after +3 s",
    "g": "0 failures (225 requests hit g1)",
    "h": "0/0/5/0",
    "i": "0 failures; dead gateways tried by 96 requests, the last at +2.7 s",
    "j": "476 failures, 438 charged twice",
}


def payswitch_cell(r: dict[str, Any]) -> str:
    base = f"{r['errors']}/{r['slow']}/{r['charged_twice']}/{r['charged_told_failed']}"
    key = r["key"]
    if key == "f":
        return f"{base}; full share after +{r['full_traffic_after_s']} s"
    if key == "g":
        return f"{base} ({r['g1_hits_during_fault']} requests hit g1)"
    if len(r.get("faulty", ())) > 1:
        return (
            f"{base}; {r['unknown']} outcome unknown; all out after {r['faulty_out_after_s']} s;"
            f" failing gateways tried {r['faulty_attempts_after_fault']} times after the"
            f" fault, the last at +{r['faulty_last_attempt_after_fault_s']} s"
        )
    return base


def anchor_table(rows: list[dict[str, Any]], envoy: dict[str, str] | None = None) -> str:
    """Markdown: scenario | payswitch (this run) | Envoy. `envoy` holds cells measured
    in this run, by scenario key; rows without one show the ANCHORS.md figure."""
    measured = envoy or {}
    lines = [
        "Cells: client failures / slower than 300 ms / charged twice / charged, told failed.",
        "",
        "| scenario | payswitch (this run) | Envoy |",
        "|---|---|---|",
    ]
    for r in rows:
        key = r["key"]
        if key in measured:
            theirs = f"{measured[key]} (this run)"
        elif key in ANCHOR_ENVOY:
            theirs = f"{ANCHOR_ENVOY[key]} (ANCHORS.md)"
        else:
            theirs = "not measured"
        lines.append(f"| ({key}) {r['title']} | {payswitch_cell(r)} | {theirs} |")
    return "\n".join(lines)
