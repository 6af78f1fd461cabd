"""The `payswitch` command: `run`, `validate` and `sim`.

Owns: argument parsing, logging set-up, the event loop choice (uvloop when installed) and
exit codes.
Must not: build runtime parts itself; `proxy.app` does.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine, Sequence
from typing import TYPE_CHECKING, Any

from proxy import version
from proxy.config.load import ConfigError, load_rules
from proxy.kafka.config import add_arguments as add_kafka_arguments
from proxy.kafka.tail import add_parser as add_tail_parser
from proxy.settings import Settings, from_sources

if TYPE_CHECKING:
    from proxy.app import Runtime

logger = logging.getLogger(__name__)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="payswitch", description="Declarative routing sidecar for payment traffic."
    )
    p.add_argument("--version", action="version", version=f"payswitch {version.version()}")
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve traffic with the rules in a directory")
    run.add_argument(
        "--rules",
        action="append",
        help="rules directory or file (repeatable; env PAYSWITCH_RULES; default rules)",
    )
    run.add_argument(
        "--listen", help="HOST:PORT for traffic (env PAYSWITCH_LISTEN; default 0.0.0.0:8080)"
    )
    run.add_argument(
        "--admin", help="HOST:PORT for the admin API (env PAYSWITCH_ADMIN; default 127.0.0.1:9901)"
    )
    run.add_argument(
        "--probes",
        help="HOST:PORT serving only /healthz, /readyz and /metrics, for kubelet and "
        "Prometheus (env PAYSWITCH_PROBES; default: none, they stay on the admin port)",
    )
    run.add_argument(
        "--admin-token",
        dest="admin_token",
        help="token every admin call but probes and metrics needs (env PAYSWITCH_ADMIN_TOKEN)",
    )
    run.add_argument(
        "--access-log",
        dest="access_log",
        choices=["on", "off"],
        help="one JSON line per request (default on)",
    )
    run.add_argument(
        "--events", help="stdout, off, or a file path for the event stream (default stdout)"
    )
    run.add_argument(
        "--events-min-severity",
        dest="events_min_severity",
        choices=["debug", "info", "warning", "error", "critical"],
    )
    run.add_argument(
        "--webhook-url",
        dest="webhook_url",
        help="POST events at or above --webhook-min-severity here",
    )
    run.add_argument(
        "--webhook-min-severity",
        dest="webhook_min_severity",
        choices=["info", "warning", "error", "critical"],
    )
    run.add_argument(
        "--webhook-format",
        dest="webhook_format",
        choices=["event", "alertmanager"],
        help="POST the event itself (default) or an Alertmanager /api/v2/alerts list",
    )
    run.add_argument(
        "--idempotency-store",
        dest="idempotency_store",
        help="memory (default) or redis://HOST:PORT/DB",
    )
    run.add_argument(
        "--idempotency-memory",
        dest="idempotency_memory_bytes",
        help="byte budget of the in-memory idempotency store (default 16MiB)",
    )
    run.add_argument(
        "--idempotency-when-full",
        dest="idempotency_when_full",
        choices=["evict", "refuse"],
        help="in-memory store full: evict the oldest completed keys (default) or refuse new ones",
    )
    run.add_argument(
        "--transaction-log-memory",
        dest="transaction_log_bytes",
        help="byte budget of the in-memory transaction log (default 4MiB)",
    )
    run.add_argument(
        "--trusted-proxies",
        dest="trusted_proxies",
        help="comma-separated CIDRs whose X-Forwarded-*/Forwarded headers are kept (e.g. Envoy"
        " in front: 127.0.0.1/32); from anyone else they are replaced",
    )
    run.add_argument(
        "--underscore-headers",
        dest="underscore_headers",
        choices=["drop", "allow"],
        help="header names with underscores: drop (default, as nginx and Envoy) or pass on",
    )
    run.add_argument(
        "--no-watch",
        dest="watch",
        action="store_const",
        const=False,
        help="do not watch the rules for changes",
    )
    run.add_argument(
        "--max-connections",
        dest="max_connections",
        type=int,
        help="cap on client connections; more are refused with 503 (env "
        "PAYSWITCH_MAX_CONNECTIONS; default min(4096, 80%% of the open-files limit))",
    )
    run.add_argument("--log-level", dest="log_level", choices=["debug", "info", "warning", "error"])
    add_kafka_arguments(run)
    run.add_argument(
        "--workers",
        help="processes serving the traffic port together, under one supervisor (env "
        "PAYSWITCH_WORKERS; default 1: no supervisor)",
    )
    val = sub.add_parser("validate", help="check rules files; exit 1 listing every problem")
    val.add_argument("paths", nargs="+", help="rules files or directories")
    val.add_argument(
        "--skip-secrets",
        action="store_true",
        help="do not read gateway header values from files or the environment "
        "(where the Secrets are not mounted, as in CI)",
    )
    sim = sub.add_parser(
        "sim", help="start simulated gateways for every loopback gateway URL in the rules"
    )
    sim.add_argument("--rules", action="append", help="rules directory or file (default rules)")
    add_tail_parser(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "validate":
        return validate(args.paths, read_secrets=not args.skip_secrets)
    if args.command == "tail":
        from proxy.kafka.tail import main as tail

        return tail(args)
    if args.command == "sim":
        from proxy.sim import run_from_rules

        _setup_logging("info")
        return _run_loop(run_from_rules(args.rules or ["rules"]))
    return run(vars(args))


def validate(paths: Sequence[str], *, read_secrets: bool = True) -> int:
    try:
        rules = load_rules(paths, read_secrets=read_secrets)
    except ConfigError as exc:
        for issue in exc.issues:
            print(issue, file=sys.stderr)
        print(f"{len(exc.issues)} problem(s) found", file=sys.stderr)
        return 1
    print(
        f"ok: {len(rules.files)} file(s), {len(rules.gateways)} gateway(s), {len(rules.routes)} route(s)"
    )
    return 0


def run(flags: dict[str, object]) -> int:
    if flags.get("access_log") is not None:
        flags["access_log"] = flags["access_log"] == "on"
    try:
        settings = from_sources(flags)
    except (ValueError, TypeError) as exc:
        _setup_logging("info")
        logger.error("bad setting: %s", exc)
        return 2
    if settings.workers > 1:
        from proxy.workers import supervise

        # Before any logging thread exists: the supervisor forks its workers.
        return supervise(settings)
    _setup_logging(settings.log_level)
    return serve_settings(settings)


def serve_settings(settings: Settings, on_ready: Callable[[Runtime], None] | None = None) -> int:
    """Serve until SIGTERM; the exit code. Logging is already set up."""
    from proxy.app import serve

    # Every stderr line of `run` is a JSON log line, failures included.
    try:
        return _run_loop(serve(settings, on_ready))
    except ConfigError as exc:
        logger.error(
            "the rules are not valid; nothing was started",
            extra={"problems": [str(issue) for issue in exc.issues]},
        )
        return 1
    except (OSError, ValueError) as exc:
        logger.error("cannot start: %s", exc)
        return 1


def _run_loop(coro: Coroutine[Any, Any, int]) -> int:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    result: int = uvloop.run(coro)
    return result


def _setup_logging(level: str) -> None:
    from proxy import logs

    logs.setup(level)
