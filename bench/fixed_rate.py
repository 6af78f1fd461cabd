"""One client at a fixed rate on one keep-alive connection, timed in microseconds.

    .venv/bin/python bench/fixed_rate.py URL [URL...] [--rate 400] [--seconds 8]

Prints one JSON object: p50/p90/p99/p99.9 in microseconds, the answers counted, the
failures and a histogram (`hist`, 100 us bins). Given several URLs, it sends to them in turn, each at `--rate` on its own
connection, and prints one such object per URL: every target is then timed through the
same seconds of the host, whose stalls (steal on a virtual machine) would otherwise land
on whichever target happened to be measured when they came. hey prints latencies in tenths of a millisecond, which is the size of the
differences between proxies at a steady rate; this client reads the clock around each
exchange with `perf_counter_ns`. Its own cost (the same for every target) is in every
figure, so compare targets measured by it, or subtract the direct upstream's.

Owns: the client loop, the percentiles, and running itself pinned to a core for several
targets at once (`measure_turns`). Must not: send anywhere but the URLs given (loopback in
every bench).
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

if __package__ in (None, ""):
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench import host, wrk

WARMUP = 200  # exchanges before the clock starts


class ExchangeError(Exception):
    """The answer was not a complete 2xx HTTP/1.1 response with a Content-Length."""


def request_bytes(url: str, body: bytes) -> bytes:
    parts = urlsplit(url)
    head = (
        f"POST {parts.path or '/'} HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return head.encode() + body


def answer_length(buf: bytes) -> int | None:
    """Bytes the answer at the start of `buf` takes, once its head is in; None before.
    Raises ExchangeError for a status other than 2xx or a body without Content-Length."""
    end = buf.find(b"\r\n\r\n")
    if end < 0:
        return None
    lines = buf[:end].split(b"\r\n")
    status = lines[0].split(b" ", 2)
    if len(status) < 2 or not status[1].startswith(b"2"):
        raise ExchangeError(f"answer: {lines[0]!r}")
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return end + 4 + int(value)
    raise ExchangeError("answer without Content-Length")


def percentiles(samples: list[int]) -> dict[str, float]:
    """p50/p90/p99/p99.9 of nanosecond samples, in microseconds (nearest rank)."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000

    return {"p50_us": at(0.5), "p90_us": at(0.9), "p99_us": at(0.99), "p999_us": at(0.999)}


#: The histogram's bins: 100 us wide from 0, the last one holding everything slower.
BIN_US = 100
BINS = 30


def histogram(samples: list[int]) -> list[int]:
    """How many of the nanosecond `samples` fell in each `BIN_US` bin (the last bin holds
    everything at or above `BINS - 1` bins). Percentiles hide the shape: on a virtual
    machine whose idle cores halt, the latencies come in two humps, one for exchanges that
    found the proxy's core awake and one for those that waited for the host to wake it."""
    bins = [0] * BINS
    for ns in samples:
        bins[min(BINS - 1, ns // (BIN_US * 1000))] += 1
    return bins


class Client:
    def __init__(self, url: str, body: bytes) -> None:
        parts = urlsplit(url)
        self._addr = (parts.hostname or "127.0.0.1", parts.port or 80)
        self._req = request_bytes(url, body)
        self._sock: socket.socket | None = None

    def exchange(self) -> int:
        """One POST and its whole answer; nanoseconds it took (connecting included)."""
        started = time.perf_counter_ns()
        if self._sock is None:
            self._sock = socket.create_connection(self._addr, timeout=10)
            self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock = self._sock
        try:
            sock.sendall(self._req)
            buf = b""
            need: int | None = None
            while need is None or len(buf) < need:
                chunk = sock.recv(65536)
                if not chunk:
                    raise ExchangeError("connection closed mid-answer")
                buf += chunk
                if need is None:
                    need = answer_length(buf)
        except (OSError, ExchangeError):
            self.close()
            raise
        return time.perf_counter_ns() - started

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


#: One target's figures as the client prints them: the percentiles, "answers" and
#: "failed" are numbers, "hist" a list of bin counts.
Figures = dict[str, Any]


def run(url: str, rate: float, seconds: float, body: bytes) -> Figures:
    return run_turns([url], rate, seconds, body)[url]


def turn(n: int, count: int) -> int:
    """Which of `count` targets the `n`th exchange goes to: each in turn, and the order
    shifted by one every cycle, so no target always follows the same one."""
    return (n + n // count) % count


def run_turns(urls: list[str], rate: float, seconds: float, body: bytes) -> dict[str, Figures]:
    """Every URL at `rate`, their exchanges interleaved on one clock; figures per URL."""
    clients = [Client(url, body) for url in urls]
    for client in clients:
        for _ in range(WARMUP):
            client.exchange()
    samples: list[list[int]] = [[] for _ in urls]
    failed = [0] * len(urls)
    interval = 1e9 / (rate * len(urls))
    start = time.perf_counter_ns()
    end = start + seconds * 1e9
    n = 0
    while (due := start + n * interval) <= end:
        wait = due - time.perf_counter_ns()
        if wait > 0:
            time.sleep(wait / 1e9)
        i = turn(n, len(urls))
        n += 1
        try:
            samples[i].append(clients[i].exchange())
        except (OSError, ExchangeError):
            failed[i] += 1
    for client in clients:
        client.close()
    return {
        url: {
            **percentiles(samples[i]),
            "answers": len(samples[i]),
            "failed": failed[i],
            "hist": histogram(samples[i]),
        }
        for i, url in enumerate(urls)
    }


def measure_turns(
    urls: dict[str, str],
    rate: float,
    seconds: float,
    *,
    core: int,
    hists: dict[str, list[int]] | None = None,
) -> dict[str, dict[str, float]]:
    """This client pinned to `core`, timing every one of `urls` in turn (`run_turns`);
    figures by name, each with the host's steal during the round (which all shared). Each
    target's histogram is added, bin by bin, to `hists[name]` when `hists` is given.
    Raises subprocess.CalledProcessError when the client fails."""
    argv = ["taskset", "-c", str(core), sys.executable, str(Path(__file__).resolve())]
    argv += [*urls.values(), "--rate", str(rate), "--seconds", str(seconds)]
    done, stolen = host.run_counting_steal(
        argv, capture_output=True, check=True, timeout=len(urls) * seconds + 60
    )
    got = json.loads(done.stdout)
    by_url: dict[str, Figures] = got if len(urls) > 1 else {next(iter(urls.values())): got}
    out: dict[str, dict[str, float]] = {}
    for name, url in urls.items():
        result = by_url[url]
        bins: list[int] = result.pop("hist")
        if hists is not None:
            summed = hists.setdefault(name, [0] * len(bins))
            hists[name] = [a + b for a, b in zip(summed, bins, strict=True)]
        if stolen is not None:
            result["steal_ms"] = stolen
        if result["failed"]:
            print(f"  {url}: {result['failed']:.0f} exchange(s) failed", file=sys.stderr)
        out[name] = result
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("urls", nargs="+", metavar="url")
    parser.add_argument("--rate", type=float, default=400.0)
    parser.add_argument("--seconds", type=float, default=8.0)
    args = parser.parse_args(argv)
    body = wrk.post_body()
    if len(args.urls) == 1:
        print(json.dumps(run(args.urls[0], args.rate, args.seconds, body)))
    else:
        print(json.dumps(run_turns(args.urls, args.rate, args.seconds, body)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
