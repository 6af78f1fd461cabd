"""What the machine itself did while a target was measured: CPU time the hypervisor took.

On a virtual machine, "steal" is time a vCPU was ready to run but the host ran something
else. A request in flight then waits for the host, whatever the proxy: at a steady 400
requests a second, p99 is the 20 slowest answers out of 2,000, and a few tens of
milliseconds of steal decide them. The steady-rate table shows the steal during each
target's rounds, so a p99 difference can be told apart from the host's.

It also says which of the test services (`make services`: Redis, the Kafka broker) are
running beside the bench: a JVM broker idling beside the proxies takes CPU from every target
now and then, and shows in the tail as steal does.

Owns: reading the steal counter, the steal during one measuring run, and the neighbours
check. Must not: judge a round by either; the report shows them.
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

PROC_STAT = Path("/proc/stat")
STEAL_FIELD = 8  # on the "cpu" line: user nice system idle iowait irq softirq steal ...


def services_for_tests() -> tuple[tuple[str, int], ...]:
    """(name, loopback port) of each service `make services` starts for the tests."""
    return (
        ("Redis", 6379),
        ("the Kafka broker", int(os.environ.get("PAYSWITCH_KAFKA_PORT", 9092))),
    )


def neighbours(services: Iterable[tuple[str, int]] | None = None) -> list[str]:
    """Names of the `services` (default: the test services) answering on 127.0.0.1."""
    found = []
    for name, port in services_for_tests() if services is None else services:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                found.append(name)
        except OSError:
            continue
    return found


def neighbours_line(names: Sequence[str]) -> str | None:
    """The report's warning about `names` running beside the bench; None when none is."""
    if not names:
        return None
    they = "they share" if len(names) > 1 else "it shares"
    return (
        f"running beside the bench: {' and '.join(names)} (make services-stop stops what "
        f"make test started); {they} the CPU with every target and can lengthen the tail"
    )


def steal_seconds(stat: Path = PROC_STAT) -> float | None:
    """CPU time stolen from this machine since boot, all CPUs summed; None where the
    kernel does not say (not Linux, or a kernel without the field)."""
    try:
        text = stat.read_text(encoding="ascii")
    except OSError:
        return None
    for line in text.splitlines():
        fields = line.split()
        if fields and fields[0] == "cpu":
            if len(fields) <= STEAL_FIELD:
                return None
            return int(fields[STEAL_FIELD]) / os.sysconf("SC_CLK_TCK")
    return None


def steal_between(before: float | None, after: float | None) -> float | None:
    """Seconds stolen between two readings; None when either is unknown."""
    if before is None or after is None:
        return None
    return max(0.0, after - before)


def run_counting_steal(
    argv: Sequence[str], **kwargs: Any
) -> tuple[subprocess.CompletedProcess[str], float | None]:
    """`subprocess.run(argv, **kwargs)` (text mode), and the milliseconds stolen while it
    ran; None when the counter cannot be read."""
    before = steal_seconds()
    done: subprocess.CompletedProcess[str] = subprocess.run(argv, text=True, **kwargs)
    stolen = steal_between(before, steal_seconds())
    return done, None if stolen is None else stolen * 1000


def summed(steals: Iterable[float | None]) -> float | None:
    """Several runs' steal as one figure; unknown when any run's is."""
    total = 0.0
    for steal in steals:
        if steal is None:
            return None
        total += steal
    return total
