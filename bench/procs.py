"""Processes the bench starts: pinned to a core, in their own process group, always reaped.

Owns: starting a command under `taskset`, its log file, stopping its whole group, free
loopback ports, waiting for an HTTP endpoint, and RSS read from /proc.
Must not: know what the processes are; targets and the load generator decide that.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

# Bench traffic is loopback only; an http_proxy in the environment must not divert it.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class BenchError(Exception):
    """A target could not be started or did not serve; the message says why."""


@dataclass(frozen=True, slots=True)
class Response:
    status: int
    body: bytes


@dataclass(slots=True)
class Started:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def log_tail(self, lines: int = 20) -> str:
        try:
            text = self.log.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


class Processes:
    """Every process started through here is stopped on `close`, also on Ctrl-C or error."""

    def __init__(self, logdir: Path) -> None:
        self._logdir = logdir
        self._running: list[Started] = []

    def start(
        self, name: str, argv: Sequence[str], *, core: int | str, env: dict[str, str] | None = None
    ) -> Started:
        """Start `argv` pinned to `core` (a number, or a taskset list such as "0,1"), with
        `env` added to this process's environment."""
        log = self._logdir / f"{name}.log"
        with log.open("ab") as out:
            popen = subprocess.Popen(
                ["taskset", "-c", str(core), *argv],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                # Own group, so a stop reaches workers too and a terminal Ctrl-C reaches only
                # us: we decide the order things stop in.
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )
        started = Started(name, popen, log)
        self._running.append(started)
        return started

    def stop(self, started: Started, *, grace: float = 10.0) -> None:
        if started in self._running:
            self._running.remove(started)
        _signal_group(started.pid, signal.SIGTERM)
        try:
            started.popen.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            logger.warning("%s did not stop within %.0fs; killing it", started.name, grace)
        # Also reaps group members that outlived the leader (an nginx worker, say).
        _signal_group(started.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            started.popen.wait(timeout=5)

    def close(self) -> None:
        try:
            for started in reversed(list(self._running)):
                self.stop(started)
        finally:
            # A second Ctrl-C during the graceful stops must still leave nothing behind.
            for started in self._running:
                _signal_group(started.pid, signal.SIGKILL)
            self._running.clear()

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


_EPHEMERAL = Path("/proc/sys/net/ipv4/ip_local_port_range")
#: Ports this process has handed out: free when checked, but promised to a server that
#: binds them later, so never handed out twice (`free_port(), free_port()` for a listener
#: and its admin port must not give one port for both).
_handed: set[int] = set()


def free_ports(n: int) -> int:
    """The first of `n` consecutive loopback ports free now, below the kernel's ephemeral
    range. A port bound to 0 and closed again comes from that range, which is also where
    every outgoing connection takes its source port: a health check of a process started a
    moment earlier could take it before the process it was meant for binds it."""
    low = int(_EPHEMERAL.read_text().split()[0])
    for _ in range(50):
        first = random.randrange(max(1024, low - 10_000), low - n)
        ports = range(first, first + n)
        if not _handed.isdisjoint(ports):
            continue
        socks: list[socket.socket] = []
        try:
            for port in ports:
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind(("127.0.0.1", port))
            _handed.update(ports)
            return first
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise BenchError(f"no {n} consecutive free ports below {low}")


def free_port() -> int:
    """One loopback port free now, below the ephemeral range (`free_ports`)."""
    return free_ports(1)


def http(method: str, url: str, body: bytes | None = None, timeout: float = 2.0) -> Response:
    headers = {"Content-Type": "application/json"} if body is not None else {}
    request = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return Response(resp.status, resp.read())
    except urllib.error.HTTPError as err:
        return Response(err.code, err.read())


def wait_ok(started: Started | None, url: str, *, timeout: float) -> None:
    """Poll GET `url` until it answers 200; fail early if the process has exited."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if started is not None and started.popen.poll() is not None:
            raise BenchError(
                f"{started.name} exited with status {started.popen.returncode} before it was "
                f"ready; last log lines:\n{started.log_tail()}"
            )
        try:
            resp = http("GET", url, timeout=1.0)
        except (OSError, urllib.error.URLError) as err:
            last = str(err)
        else:
            if resp.status == 200:
                return
            last = f"status {resp.status}"
        time.sleep(0.1)
    tail = f"; last log lines:\n{started.log_tail()}" if started is not None else ""
    raise BenchError(f"GET {url} not 200 after {timeout:.0f}s ({last}){tail}")


def children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces and parentheses; fields resume after the last ")".
        fields = stat[stat.rindex(")") + 2 :].split()
        if int(fields[1]) == pid:
            found.append(int(entry.name))
    return found


def rss_mib(pid: int, field: str = "VmRSS") -> float | None:
    """Resident memory of `pid` now (VmRSS), or its peak so far (VmHWM)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return None
    for line in status.splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return None


def tree_rss_mib(pid: int, *, include_root: bool = True, peak: bool = False) -> float | None:
    """RSS of `pid` and its descendants (without `pid` itself for an nginx master); with
    `peak`, the sum of each process's high-water mark."""
    pids = [pid] if include_root else []
    frontier = [pid]
    while frontier:
        kids = children(frontier.pop())
        pids.extend(kids)
        frontier.extend(kids)
    field = "VmHWM" if peak else "VmRSS"
    sizes = [size for size in (rss_mib(p, field) for p in pids) if size is not None]
    return sum(sizes) if sizes else None
