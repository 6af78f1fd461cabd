"""The supervisor's pure parts: restart back-off, exit descriptions, and the workers
setting with the port ranges it implies."""

from __future__ import annotations

import os
import signal
import time

import pytest

from proxy.settings import from_sources
from proxy.workers import BACKOFF_MAX, backoff, describe_exit

BACKOFF = {
    "first death": (1, 0.25),
    "second in a row": (2, 0.5),
    "fifth in a row": (5, 4.0),
    "capped": (20, BACKOFF_MAX),
    "none yet": (0, 0.25),
}


@pytest.mark.parametrize(("deaths", "delay"), BACKOFF.values(), ids=BACKOFF)
def test_backoff_doubles_per_quick_death_up_to_the_cap(deaths: int, delay: float) -> None:
    assert backoff(deaths) == delay


def _status_of(child: str) -> int:
    """A real wait status: fork a child that exits or is killed as `child` says."""
    pid = os.fork()
    if pid == 0:
        if child == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        os._exit(int(child))
    _, status = os.waitpid(pid, 0)
    return status


EXITS = {
    "clean": ("0", {"exit_code": 0}),
    "failed": ("3", {"exit_code": 3}),
    "killed": ("kill", {"signal": "SIGKILL"}),
}


# Forking from a test process that may run threads (Python 3.12 warns); the child
# makes a few plain calls and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
@pytest.mark.parametrize(("child", "fields"), EXITS.values(), ids=EXITS)
def test_describe_exit(child: str, fields: dict[str, object]) -> None:
    assert describe_exit(_status_of(child)) == fields


WORKERS = {
    "default": ({}, {}, 1),
    "flag": ({"workers": "4"}, {}, 4),
    "env": ({}, {"PAYSWITCH_WORKERS": "2"}, 2),
    "flag beats env": ({"workers": "3"}, {"PAYSWITCH_WORKERS": "2"}, 3),
}


@pytest.mark.parametrize(("flags", "env", "expected"), WORKERS.values(), ids=WORKERS)
def test_workers_setting(flags: dict[str, object], env: dict[str, str], expected: int) -> None:
    assert from_sources(flags, env).workers == expected


BAD = {
    "zero": ({"workers": "0"}, "from 1 to 64"),
    "negative": ({"workers": "-2"}, "from 1 to 64"),
    "word": ({"workers": "many"}, "from 1 to 64"),
    "too many": ({"workers": "65"}, "from 1 to 64"),
    "admin range covers probes": (
        {"workers": "3", "admin": ":9901", "probes": ":9903"},
        "admin ports 9901..9903 and the probes ports 9903..9905 overlap",
    ),
    "admin range covers listen": (
        {"workers": "2", "admin": ":8080", "listen": ":8081"},
        "admin ports 8080..8081 and the listen ports 8081..8081 overlap",
    ),
    "past the last port": ({"workers": "2", "admin": ":65535"}, "pass 65535"),
    "listen on a random port": ({"workers": "2", "listen": ":0"}, "need a fixed listen port"),
}


@pytest.mark.parametrize(("flags", "message"), BAD.values(), ids=BAD)
def test_bad_workers_settings_are_refused(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_sources(flags, {})


RANGES_OK = {
    "defaults": {"workers": "8"},
    "ephemeral admin": {"workers": "4", "admin": ":0", "listen": ":1"},
    "one worker on a random port": {"workers": "1", "listen": ":0"},
    "probes apart": {"workers": "4", "admin": ":9901", "probes": ":9102"},
}


@pytest.mark.parametrize("flags", RANGES_OK.values(), ids=RANGES_OK)
def test_port_ranges_that_do_not_overlap(flags: dict[str, object]) -> None:
    assert from_sources(flags, {}).workers == int(str(flags["workers"]))


def test_a_fork_that_fails_is_a_failed_start_with_back_off(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Out of processes or memory: nothing is forked, the slot backs off, and after
    MAX_FAILED_STARTS in a row the supervisor stops with a failure."""
    from proxy.settings import Settings
    from proxy.worker_log import SupervisorLog
    from proxy.workers import MAX_FAILED_STARTS, Supervisor

    def no_fork() -> int:
        raise BlockingIOError(11, "Resource temporarily unavailable")

    r, w = os.pipe()
    sup = Supervisor(Settings(workers=2), SupervisorLog(w))
    monkeypatch.setattr(os, "fork", no_fork)
    slot = sup.slots[0]
    waits = []
    for _ in range(MAX_FAILED_STARTS - 1):
        sup._start(slot)
        assert slot.pid is None and slot.restart_at is not None and not sup.stopping
        waits.append(slot.restart_at - time.monotonic())
    assert waits == sorted(waits) and waits[-1] > 1.5  # 0.25, 0.5, 1, 2 s
    assert slot.failed_starts == MAX_FAILED_STARTS - 1
    sup._start(slot)
    assert sup.stopping and sup.failed and slot.restart_at is None
    messages = [r.getMessage() for r in caplog.records]
    assert "worker 0 could not be started; restarting it in 0.25s" in messages
    assert "worker 0 failed to start 5 times in a row; stopping every worker" in messages
    for fd in (r, w, sup.wake_r, sup.wake_w):
        os.close(fd)


def _sleeping_child() -> int:
    pid = os.fork()
    if pid == 0:
        time.sleep(60)
        os._exit(0)
    return pid


# Forking from a test process that may run threads (Python 3.12 warns); the child
# makes a few plain calls and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_worker_stuck_at_start_is_killed_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from proxy.settings import Settings
    from proxy.worker_log import SupervisorLog
    from proxy.workers import START_TIMEOUT, Supervisor

    r, w = os.pipe()
    sup = Supervisor(Settings(workers=2), SupervisorLog(w))
    slot = sup.slots[1]
    slot.pid = _sleeping_child()
    slot.started_at = time.monotonic() - START_TIMEOUT + 5
    sup._kill_stuck()
    spared = not slot.killed  # not yet
    assert spared
    slot.started_at = time.monotonic() - START_TIMEOUT - 1
    sup._kill_stuck()
    assert slot.killed
    pid = slot.pid
    _, status = os.waitpid(pid, 0)
    sup._exited(slot, status)
    assert slot.failed_starts == 1 and slot.restart_at is not None
    assert slot.replaces is not None and slot.replaces["exit"] == "signal SIGKILL"
    messages = [rec.getMessage() for rec in caplog.records]
    assert f"worker 1 not serving after {START_TIMEOUT:.0f}s; killing it" in messages
    for fd in (r, w, sup.wake_r, sup.wake_w):
        os.close(fd)


# Forking from a test process that may run threads (Python 3.12 warns); the child
# makes a few plain calls and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_workers_still_draining_past_the_stop_deadline_are_killed() -> None:
    from proxy.settings import Settings
    from proxy.worker_log import SupervisorLog
    from proxy.workers import Supervisor

    r, w = os.pipe()
    sup = Supervisor(
        Settings(workers=2, shutdown_grace=0.0, shutdown_deadline=0.0), SupervisorLog(w)
    )
    for slot in sup.slots:
        slot.pid, slot.serving = _sleeping_child(), True
    pids = [s.pid for s in sup.slots]
    sup._stop("test")  # SIGTERM: the sleeping children die of it at once
    for pid in pids:
        assert pid is not None
        _, status = os.waitpid(pid, 0)
        assert os.WTERMSIG(status) == signal.SIGTERM
    for slot in sup.slots:
        slot.pid, slot.serving = _sleeping_child(), True  # now ones that ignore nothing yet
    assert sup.stop_by is not None
    sup.stop_by = time.monotonic() - 1
    sup._kill_stuck()
    for slot in sup.slots:
        assert slot.killed and slot.pid is not None
        _, status = os.waitpid(slot.pid, 0)
        assert os.WTERMSIG(status) == signal.SIGKILL
    assert sup.killed_all
    for fd in (r, w, sup.wake_r, sup.wake_w):
        os.close(fd)
