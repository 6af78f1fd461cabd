"""`payswitch run --workers N`: one supervisor process, N worker processes on one port.

Owns: the supervisor (validates the rules once, forks the workers, forwards SIGTERM/SIGINT
and SIGHUP to them, restarts a worker that dies with a back-off, gives up when workers keep
failing at start, and refuses to start several workers on idempotency keys each would
keep to itself). What a worker does once forked is `proxy.worker_process`.
Must not: serve traffic itself, or run an event loop or a thread: the workers are forked
from it at any time (a restart), and a fork copies only the forking thread, so a lock held
by another thread would stay locked in the child forever.

Why fork and not spawn: a forked worker starts with the package already imported (shared
copy-on-write with the supervisor and its siblings), so it is serving in a fraction of the
time a fresh interpreter takes to import aiohttp, prometheus-client and OpenTelemetry, and
those pages stay shared. This needs the supervisor free of threads, hence its logging goes
through a buffer written from its own loop (`proxy.worker_log`).
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import logging
import mmap
import os
import selectors
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import NoReturn

from proxy.config.load import ConfigError, load_rules
from proxy.settings import Settings
from proxy.worker_log import SupervisorLog
from proxy.worker_process import check_shared_keys, run_worker

logger = logging.getLogger("proxy.workers")

#: First restart delay of a worker that died; doubled for each quick death in a row.
BACKOFF_BASE = 0.25
BACKOFF_MAX = 30.0
#: A worker that served this long before dying starts its back-off over.
STABLE_AFTER = 30.0
#: Deaths in a row before ever serving after which the supervisor stops everything.
MAX_FAILED_STARTS = 5
#: A worker not serving this long after its fork is stuck: it is killed (a failed start).
START_TIMEOUT = 60.0
#: After a stop, workers get their grace and deadline and this much more, then SIGKILL.
STOP_MARGIN = 10.0
_FORWARDED = {signal.SIGHUP}
_STOP = {signal.SIGTERM, signal.SIGINT}


# -- pure parts --------------------------------------------------------------------------


def backoff(quick_deaths: int) -> float:
    """Seconds before restarting a worker after `quick_deaths` quick deaths in a row."""
    return min(BACKOFF_BASE * 2.0 ** max(0, quick_deaths - 1), BACKOFF_MAX)


def describe_exit(status: int) -> dict[str, object]:
    """A wait status as log fields: `exit_code`, or `signal` by name."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            return {"signal": signal.Signals(sig).name}
        except ValueError:
            return {"signal": sig}
    return {"exit_code": os.waitstatus_to_exitcode(status)}


# -- the supervisor ----------------------------------------------------------------------


@dataclass(slots=True)
class Slot:
    """One worker position: the process holding it now, if any, and its history."""

    index: int
    pid: int | None = None
    ready_fd: int | None = None  # read end of the pipe the worker says "serving" on
    serving: bool = False
    started_at: float = 0.0
    quick_deaths: int = 0  # deaths in a row after serving less than STABLE_AFTER
    failed_starts: int = 0  # deaths in a row before serving at all
    restart_at: float | None = None
    killed: bool = False  # SIGKILL sent: stuck at start, or past the stop deadline
    replaces: dict[str, object] | None = None  # the last death, until a worker serves again
    exits: list[int] = field(default_factory=list)  # exit codes after a requested stop


class Supervisor:
    """Starts, watches, signals and restarts the workers; `run` returns the exit code."""

    def __init__(self, settings: Settings, log: SupervisorLog) -> None:
        self.settings = settings
        self.log = log
        self.slots = [Slot(i) for i in range(settings.workers)]
        # Byte i is 1 while worker i serves: every worker reads it for its readiness.
        self.status = mmap.mmap(-1, settings.workers)
        self.sel = selectors.DefaultSelector()
        self.wake_r, self.wake_w = os.pipe()
        os.set_blocking(self.wake_r, False)
        os.set_blocking(self.wake_w, False)
        self.sel.register(self.wake_r, selectors.EVENT_READ)
        self.stopping = False
        self.stop_by: float | None = None  # after a stop, when the rest are killed
        self.killed_all = False
        self.failed = False
        self.pid = os.getpid()

    def run(self) -> int:
        for sig in (*_STOP, *_FORWARDED, signal.SIGCHLD):
            signal.signal(sig, _note_signal)
        signal.set_wakeup_fd(self.wake_w)
        for slot in self.slots:
            self._start(slot)
        while True:
            self._reap()
            if self.stopping and all(s.pid is None for s in self.slots):
                break
            self._start_due()
            self._kill_stuck()
            for key, _ in self.sel.select(self._timeout()):
                if key.fd == self.wake_r:
                    self._signals()
                else:
                    self._ready_message(key.fd)
            self.log.flush_some()
        exits = [code for s in self.slots for code in s.exits]
        code = 1 if self.failed or any(exits) else 0
        logger.info("every worker has stopped", extra={"exit_code": code})
        return code

    def _deadlines(self) -> list[float]:
        """When something must happen: a restart, a stuck start, the end of a stop."""
        due = [s.restart_at for s in self.slots if s.restart_at is not None]
        due += [
            s.started_at + START_TIMEOUT
            for s in self.slots
            if s.pid is not None and not s.serving and not s.killed
        ]
        if self.stop_by is not None and not self.killed_all:
            due.append(self.stop_by)
        return due

    def _kill_stuck(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.pid is None or slot.killed:
                continue
            stuck = not slot.serving and now - slot.started_at > START_TIMEOUT
            late = self.stop_by is not None and now > self.stop_by
            if stuck or late:
                why = f"not serving after {START_TIMEOUT:.0f}s" if stuck else "still draining"
                logger.error(
                    "worker %d %s; killing it",
                    slot.index,
                    why,
                    extra={"worker": slot.index, "pid": slot.pid},
                )
                slot.killed = True
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, signal.SIGKILL)
        if self.stop_by is not None and now > self.stop_by:
            self.killed_all = True

    def _timeout(self) -> float | None:
        due = self._deadlines()
        waits = [max(0.0, min(due) - time.monotonic())] if due else []
        if self.log.pending:
            waits.append(0.05)  # stderr is not selected: a pipe nobody reads must not spin
        return min(waits) if waits else None

    # -- signals ---------------------------------------------------------------------------

    def _signals(self) -> None:
        try:
            data = os.read(self.wake_r, 512)
        except BlockingIOError:
            return
        for signum in data:
            if signum in _STOP:
                self._stop(f"{signal.Signals(signum).name} received")
            elif signum in _FORWARDED:
                logger.info("SIGHUP received: every worker reloads its rules")
                self._send(signal.SIGHUP)

    def _stop(self, why: str) -> None:
        if not self.stopping:
            logger.info("%s: draining every worker", why)
            grace = self.settings.shutdown_grace + self.settings.shutdown_deadline
            self.stop_by = time.monotonic() + grace + STOP_MARGIN
        self.stopping = True
        for slot in self.slots:
            slot.restart_at = None
        self._send(signal.SIGTERM)

    def _send(self, sig: signal.Signals) -> None:
        for slot in self.slots:
            if slot.pid is not None:
                # A worker dead and not reaped yet is _reap's to handle.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(slot.pid, sig)

    # -- workers ---------------------------------------------------------------------------

    def _start(self, slot: Slot) -> None:
        slot.restart_at = None
        self.log.flush_all(0.5)  # a forked child must not inherit lines to write again
        read_fd, write_fd = -1, -1
        try:
            read_fd, write_fd = os.pipe()
            pid = os.fork()
        except OSError as exc:  # out of processes, memory or descriptors: a failed start
            for fd in (read_fd, write_fd):
                if fd >= 0:
                    os.close(fd)
            slot.serving = False
            self._unexpected(slot, 0.0, {"worker": slot.index, "error": str(exc)}, None)
            return
        if pid == 0:
            os.close(read_fd)
            keep = {write_fd, 0, 1, 2}
            self._become_worker(slot, write_fd, keep)
        os.close(write_fd)
        os.set_blocking(read_fd, False)
        slot.pid, slot.ready_fd, slot.serving, slot.killed = pid, read_fd, False, False
        slot.started_at = time.monotonic()
        self.sel.register(read_fd, selectors.EVENT_READ)
        logger.info("worker %d started", slot.index, extra={"worker": slot.index, "pid": pid})

    def _become_worker(self, slot: Slot, ready_fd: int, keep: set[int]) -> NoReturn:
        signal.set_wakeup_fd(-1)
        self.sel.close()  # the child's copy of the supervisor's epoll descriptor
        for fd in (self.wake_r, self.wake_w, *(s.ready_fd for s in self.slots)):
            if fd is not None and fd not in keep:
                os.close(fd)
        run_worker(
            self.settings, slot.index, self.status, ready_fd, self.pid, replaces=slot.replaces
        )

    def _ready_message(self, fd: int) -> None:
        slot = next(s for s in self.slots if s.ready_fd == fd)
        try:
            data = os.read(fd, 64)
        except BlockingIOError:
            return
        if not data:  # the worker closed it: it is exiting
            self._forget_pipe(slot)
            return
        if not slot.serving:
            slot.serving = True
            slot.failed_starts = 0
            slot.replaces = None  # the worker now serving has said whom it replaced
            self.status[slot.index] = 1
            logger.info(
                "worker %d serving", slot.index, extra={"worker": slot.index, "pid": slot.pid}
            )

    def _forget_pipe(self, slot: Slot) -> None:
        if slot.ready_fd is not None:
            self.sel.unregister(slot.ready_fd)
            os.close(slot.ready_fd)
            slot.ready_fd = None

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            slot = next((s for s in self.slots if s.pid == pid), None)
            if slot is not None:
                self._exited(slot, status)

    def _exited(self, slot: Slot, status: int) -> None:
        ran = time.monotonic() - slot.started_at
        fields: dict[str, object] = {"worker": slot.index, "pid": slot.pid, "ran_s": round(ran, 3)}
        fields.update(describe_exit(status))
        self.status[slot.index] = 0
        self._forget_pipe(slot)
        slot.pid = None
        if self.stopping:
            # A worker stopped by a signal before it could handle it had nothing to drain.
            stopped = os.WIFSIGNALED(status) and os.WTERMSIG(status) in _STOP
            slot.exits.append(0 if stopped else os.waitstatus_to_exitcode(status))
            logger.info("worker %d stopped", slot.index, extra=fields)
            return
        self._unexpected(slot, ran, fields, status)

    def _unexpected(
        self, slot: Slot, ran: float, fields: dict[str, object], status: int | None
    ) -> None:
        """A worker died, or could not be forked: restart it after a back-off, or stop
        everything when it keeps failing before it serves."""
        if not slot.serving:
            slot.failed_starts += 1
        slot.quick_deaths = slot.quick_deaths + 1 if ran < STABLE_AFTER else 1
        if slot.failed_starts >= MAX_FAILED_STARTS:
            logger.critical(
                "worker %d failed to start %d times in a row; stopping every worker",
                slot.index,
                slot.failed_starts,
                extra=fields,
            )
            self.failed = True
            self._stop("workers keep failing at start")
            return
        if status is not None:
            slot.replaces = {
                "previous_pid": fields["pid"],
                "exit": _exit_text(status),
                "ran_s": fields["ran_s"],
            }
        delay = backoff(slot.quick_deaths)
        slot.restart_at = time.monotonic() + delay
        what = "died unexpectedly" if status is not None else "could not be started"
        logger.error(
            "worker %d %s; restarting it in %.2fs",
            slot.index,
            what,
            delay,
            extra={**fields, "restart_in_s": delay, "failed_starts": slot.failed_starts},
        )

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now and not self.stopping:
                self._start(slot)


def _exit_text(status: int) -> str:
    described = describe_exit(status)
    if "signal" in described:
        return f"signal {described['signal']}"
    return f"exit code {described['exit_code']}"


def _note_signal(_signum: int, _frame: object) -> None:
    """The wakeup fd carries the signal number to the loop; nothing to do here."""


# -- entry -------------------------------------------------------------------------------


def supervise(settings: Settings, *, log: SupervisorLog | None = None) -> int:
    """`payswitch run` with workers > 1; returns the exit code."""
    log = log or SupervisorLog.install(settings.log_level)
    try:
        return _supervise(settings, log)
    finally:
        log.flush_all(2.0)


def _supervise(settings: Settings, log: SupervisorLog) -> int:
    if not sys.platform.startswith("linux"):
        logger.error("--workers above 1 needs Linux (SO_REUSEPORT balancing, PR_SET_PDEATHSIG)")
        return 2
    try:
        rules = load_rules(settings.rules)
    except ConfigError as exc:
        logger.error(
            "the rules are not valid; nothing was started",
            extra={"problems": [str(issue) for issue in exc.issues]},
        )
        return 1
    try:
        check_shared_keys(settings, rules)
    except ConfigError as exc:
        logger.error("refusing to start %d workers: %s", settings.workers, exc.issues[0].message)
        return 2
    for module in ("proxy.app", "proxy.admin", "proxy.cli"):
        importlib.import_module(module)  # imported once here, shared by every forked worker
    gc.collect()
    gc.freeze()  # keep the collector off the shared pages in every child
    sup = Supervisor(settings, log)
    logger.info(
        "starting %d workers on %s:%d",
        settings.workers,
        *settings.listen,
        extra={"admin_ports": _port_range(settings.admin[1], settings.workers)},
    )
    return sup.run()


def _port_range(port: int, n: int) -> str:
    return f"{port}-{port + n - 1}" if port else "ephemeral"
