"""What makes a forked process a worker of `payswitch run --workers N`.

Owns: a worker's settings (admin and probes on their port + its index), its death with
the supervisor (PR_SET_PDEATHSIG: SIGTERM, so it drains), its readiness tied to the other
workers' (a byte each in memory shared with the supervisor), `payswitch_worker_info`, and
the refusal of rules whose idempotency keys each worker would keep to itself.
Must not: supervise anything; `proxy.workers` does.
"""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import mmap
import os
import signal
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from proxy.config.issues import ConfigIssue
from proxy.config.load import ConfigError
from proxy.config.model import Rules
from proxy.event_kinds import Severity
from proxy.settings import Settings

if TYPE_CHECKING:
    from proxy.app import Runtime

logger = logging.getLogger("proxy.workers")

_PR_SET_PDEATHSIG = 1


def worker_settings(settings: Settings, index: int) -> Settings:
    """Worker `index`'s settings: admin and probes on their port + index (0 stays 0:
    an ephemeral port each), and a Kafka spill file and client id of its own."""

    def shifted(addr: tuple[str, int]) -> tuple[str, int]:
        return (addr[0], addr[1] + index if addr[1] else 0)

    probes = shifted(settings.probes) if settings.probes is not None else None
    kafka = settings.kafka
    if kafka is not None and index > 0:
        # One spill file per writer: two processes appending to one file would interleave
        # their records and each commit the other's offsets. Worker 0 keeps the configured
        # name, so a single-process spill left behind is still sent.
        spill = Path(kafka.spill_path)
        kafka = dataclasses.replace(
            kafka,
            spill_path=str(spill.with_name(f"{spill.stem}.{index}{spill.suffix}")),
            client_id=f"{kafka.client_id}-{index}",
        )
    return dataclasses.replace(settings, admin=shifted(settings.admin), probes=probes, kafka=kafka)


def check_shared_keys(settings: Settings, rules: Rules) -> None:
    """Refuse rules whose routes claim idempotency keys when each worker would keep its own
    keys: a client's retry can reach another worker, which would not know the key and
    would send the payment again. Raises ConfigError naming the routes and the fix."""
    if settings.workers <= 1 or settings.idempotency_store != "memory":
        return
    keyed = [r.name for r in rules.routes if r.idempotency is not None]
    if not keyed:
        return
    raise ConfigError(
        [
            ConfigIssue(
                ", ".join(rules.files) or "-",
                0,
                "",
                f"route(s) {', '.join(keyed)} use idempotency keys, and with {settings.workers} "
                "workers each would keep its own in memory: a retried payment landing on "
                "another worker could be charged twice. Share the keys with "
                "--idempotency-store redis://HOST:PORT/DB (PAYSWITCH_IDEMPOTENCY_STORE), or "
                "run one worker",
            )
        ]
    )


class WorkerInfo(Collector):
    """`payswitch_worker_info{worker, workers, pid} 1`: which worker a scrape reached."""

    def __init__(self, index: int, workers: int) -> None:
        self.labels = [str(index), str(workers), str(os.getpid())]

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            "payswitch_worker_info",
            "The worker process serving this admin port, of how many.",
            labels=["worker", "workers", "pid"],
        )
        family.add_metric(self.labels, 1.0)
        yield family


def _die_with(parent: int) -> None:
    """Ask Linux to send SIGTERM (a drain) when the supervisor dies, and check it has not
    already: an orphaned worker would hold the port for nobody to stop."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    if os.getppid() != parent:
        os._exit(1)


def _reload_all(parent: int) -> None:
    """`POST /admin/reload` reached one worker and changed its rules: have the supervisor
    reload every worker (this one finds nothing new and stays as it is)."""
    if os.getppid() == parent:
        os.kill(parent, signal.SIGHUP)


def run_worker(
    settings: Settings,
    index: int,
    status: mmap.mmap,
    ready_fd: int,
    parent: int,
    *,
    replaces: Mapping[str, object] | None = None,
) -> NoReturn:
    """The body of a forked worker: never returns. `replaces` describes the worker that
    died before it (`previous_pid`, `exit`, `ran_s`), for the `worker.restarted` event."""
    code = 1
    try:
        _die_with(parent)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until the loop takes it: no death
        from proxy import logs
        from proxy.cli import serve_settings

        logs.share_outputs()  # the other workers write to the same stdout and stderr
        logs.setup(settings.log_level)
        n = settings.workers

        def on_ready(rt: Runtime) -> None:
            check_shared_keys(settings, rt.store.current.rules)  # changed since the check?
            rt.store.add_binder(lambda rules, _: check_shared_keys(settings, rules))
            rt.workers_down = lambda: [i for i in range(n) if not status[i]]
            rt.store.add_listener(
                lambda new, _: _reload_all(parent) if new.trigger == "admin" else None
            )
            rt.registry.register(WorkerInfo(index, n))
            os.write(ready_fd, b"r")
            if replaces is not None:
                rt.events.emit(
                    "worker.restarted", Severity.ERROR, worker=index, pid=os.getpid(), **replaces
                )

        code = serve_settings(worker_settings(settings, index), on_ready)
    except BaseException:
        logger.exception("worker %d failed", index)
    finally:
        try:
            from proxy import logs

            logs.close_writers(2.0)
        finally:
            os._exit(code)
