"""The load generator: one wrk run and what its `--latency` report says.

Owns: the wrk command line (1 thread, 50 connections, the POST of bench/post.lua), running
it bounded in time, and parsing its report (req/s, p50, p99, non-2xx/3xx, socket errors).
Must not: decide whether a target passed; that is the runner's call.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path

POST_SCRIPT = Path(__file__).resolve().parent / "post.lua"
THREADS = 1
CONNECTIONS = 50
TIMEOUT = "2s"

_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0, "h": 3_600_000.0}
_LATENCY = re.compile(r"^\s*(50|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s|m|h)\s*$", re.MULTILINE)
_REQUESTS = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", re.MULTILINE)
_RATE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.MULTILINE)
_NON_2XX = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
_SOCKET = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)",
)
_BODY = re.compile(r"^wrk\.body\s*=\s*'(.*)'\s*$", re.MULTILINE)


class WrkOutputError(ValueError):
    """wrk printed something this parser does not understand."""


@dataclass(frozen=True, slots=True, kw_only=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    non_2xx: int  # wrk counts statuses >= 400 ("Non-2xx or 3xx")
    socket_errors: int  # connect + read + write + timeout

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def binary() -> str | None:
    return shutil.which("wrk")


def post_body(script: Path = POST_SCRIPT) -> bytes:
    """The body wrk sends, so smoke checks send the very same bytes."""
    match = _BODY.search(script.read_text(encoding="utf-8"))
    if match is None:
        raise WrkOutputError(f"{script}: no single-quoted one-line wrk.body")
    return match.group(1).encode()


def _ms(value: str, unit: str) -> float:
    return float(value) * _UNITS_MS[unit]


def parse(text: str) -> WrkResult:
    latencies = {pct: _ms(value, unit) for pct, value, unit in _LATENCY.findall(text)}
    requests = _REQUESTS.search(text)
    rate = _RATE.search(text)
    if requests is None or rate is None or set(latencies) != {"50", "99"}:
        raise WrkOutputError(f"cannot parse wrk output:\n{text}")
    non_2xx = _NON_2XX.search(text)
    socket = _SOCKET.search(text)
    return WrkResult(
        requests=int(requests.group(1)),
        seconds=_ms(requests.group(2), requests.group(3)) / 1000,
        rps=float(rate.group(1)),
        p50_ms=latencies["50"],
        p99_ms=latencies["99"],
        non_2xx=int(non_2xx.group(1)) if non_2xx else 0,
        socket_errors=sum(int(n) for n in socket.groups()) if socket else 0,
    )


def command(url: str, seconds: float, *, core: int) -> list[str]:
    return [
        "taskset",
        "-c",
        str(core),
        binary() or "wrk",
        f"-t{THREADS}",
        f"-c{CONNECTIONS}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={TIMEOUT}",
        "--latency",
        "-s",
        str(POST_SCRIPT),
        url,
    ]


def run(url: str, seconds: float, *, core: int) -> WrkResult:
    argv = command(url, seconds, core=core)
    # Own session: a terminal Ctrl-C reaches the runner, whose cleanup then kills wrk.
    done = subprocess.run(
        argv, capture_output=True, text=True, timeout=seconds + 30, start_new_session=True
    )
    if done.returncode != 0:
        raise WrkOutputError(f"wrk exited {done.returncode}: {done.stderr.strip()}")
    return parse(done.stdout)
