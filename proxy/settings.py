"""Static process settings: fixed for the life of the process, unlike the rules.

Owns: `Settings` and how it is read from command-line flags and `PAYSWITCH_*` variables.
Must not: hold anything hot-reloaded; rules live in proxy.config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.headers import parse_networks
from proxy.kafka.config import KafkaSettings
from proxy.kafka.config import from_sources as kafka_from_sources


def parse_hostport(text: str, *, what: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{what}: expected HOST:PORT, got {text!r}")
    host = host.strip("[]") or "0.0.0.0"
    return host, int(port)


def is_loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    rules: tuple[str, ...] = ("rules",)
    listen: tuple[str, int] = ("0.0.0.0", 8080)
    admin: tuple[str, int] = ("127.0.0.1", 9901)
    # /healthz, /readyz and /metrics on a port of their own (None: only on the admin port),
    # so kubelet and Prometheus reach them while the admin API stays on loopback.
    probes: tuple[str, int] | None = None
    admin_token: str | None = None
    access_log: bool = True
    events: str = "stdout"  # stdout | off | a file path
    events_min_severity: str = "info"
    webhook_url: str | None = None
    webhook_min_severity: str = "error"
    webhook_format: str = "event"  # event | alertmanager
    idempotency_store: str = "memory"  # memory | redis://host:port/db
    idempotency_prefix: str = "payswitch:"
    # The in-memory stores' budgets (see README "Memory"); Redis keeps no such bound.
    idempotency_memory_bytes: int = 16 * 1024 * 1024
    idempotency_when_full: str = "evict"  # evict | refuse
    transaction_log_bytes: int = 4 * 1024 * 1024
    # Peers whose X-Forwarded-*/Forwarded headers are kept and extended (Envoy in front);
    # from anyone else they are replaced.
    trusted_proxies: tuple[str, ...] = ()
    underscore_headers: str = "drop"  # drop | allow
    watch: bool = True
    shutdown_grace: float = 2.0  # readiness fails, traffic still served
    shutdown_deadline: float = 20.0  # in-flight requests get this long to finish
    max_connections: int | None = None  # None: min(4096, 80% of the open-files limit)
    log_level: str = "info"
    kafka: KafkaSettings | None = None  # off unless a bootstrap server is configured
    # Processes serving the traffic port together (SO_REUSEPORT) under one supervisor;
    # 1 is a single process with no supervisor (see README "Several workers").
    workers: int = 1

    @property
    def admin_needs_token(self) -> bool:
        return not is_loopback(self.admin[0])


ENV = {
    "rules": "PAYSWITCH_RULES",
    "listen": "PAYSWITCH_LISTEN",
    "admin": "PAYSWITCH_ADMIN",
    "probes": "PAYSWITCH_PROBES",
    "admin_token": "PAYSWITCH_ADMIN_TOKEN",
    "access_log": "PAYSWITCH_ACCESS_LOG",
    "events": "PAYSWITCH_EVENTS",
    "events_min_severity": "PAYSWITCH_EVENTS_MIN_SEVERITY",
    "webhook_url": "PAYSWITCH_WEBHOOK_URL",
    "webhook_min_severity": "PAYSWITCH_WEBHOOK_MIN_SEVERITY",
    "webhook_format": "PAYSWITCH_WEBHOOK_FORMAT",
    "idempotency_store": "PAYSWITCH_IDEMPOTENCY_STORE",
    "idempotency_prefix": "PAYSWITCH_IDEMPOTENCY_PREFIX",
    "idempotency_memory_bytes": "PAYSWITCH_IDEMPOTENCY_MEMORY",
    "idempotency_when_full": "PAYSWITCH_IDEMPOTENCY_WHEN_FULL",
    "transaction_log_bytes": "PAYSWITCH_TRANSACTION_LOG_MEMORY",
    "trusted_proxies": "PAYSWITCH_TRUSTED_PROXIES",
    "underscore_headers": "PAYSWITCH_UNDERSCORE_HEADERS",
    "watch": "PAYSWITCH_WATCH",
    "shutdown_grace": "PAYSWITCH_SHUTDOWN_GRACE",
    "shutdown_deadline": "PAYSWITCH_SHUTDOWN_DEADLINE",
    "max_connections": "PAYSWITCH_MAX_CONNECTIONS",
    "log_level": "PAYSWITCH_LOG_LEVEL",
    "workers": "PAYSWITCH_WORKERS",
}

#: More workers than this is a typo, not a deployment: each is a whole proxy process.
MAX_WORKERS = 64


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on/off, got {text!r}")


def _size(text: str, var: str) -> int:
    from proxy.config.units import parse_size

    try:
        size = parse_size(text)
    except ValueError as exc:
        raise ValueError(f"{var}: {exc}") from None
    if size < 64 * 1024:
        raise ValueError(f"{var}: at least 64KiB, got {text!r}")
    return size


def from_sources(
    flags: Mapping[str, object | None], env: Mapping[str, str] = os.environ
) -> Settings:
    """Settings from flags, then environment variables, then defaults; raises ValueError."""
    values: dict[str, object] = {}
    for name, var in ENV.items():
        raw = flags.get(name)
        if raw is None and var in env:
            raw = env[var]
        if raw is None:
            continue
        if name == "rules":
            values[name] = (
                tuple(raw) if isinstance(raw, list | tuple) else tuple(str(raw).split(","))
            )
        elif name in ("listen", "admin", "probes"):
            values[name] = parse_hostport(str(raw), what=name)
        elif name in ("access_log", "watch"):
            values[name] = raw if isinstance(raw, bool) else _bool(str(raw))
        elif name in ("shutdown_grace", "shutdown_deadline"):
            values[name] = float(str(raw))
        elif name == "max_connections":
            text = str(raw).strip()
            if not text.isdigit() or int(text) < 1:
                raise ValueError(f"max_connections: expected a positive number, got {raw!r}")
            values[name] = int(text)
        elif name == "workers":
            text = str(raw).strip()
            if not text.isdigit() or not 1 <= int(text) <= MAX_WORKERS:
                raise ValueError(f"workers: expected a number from 1 to {MAX_WORKERS}, got {raw!r}")
            values[name] = int(text)
        elif name in ("idempotency_memory_bytes", "transaction_log_bytes"):
            values[name] = _size(str(raw), var)
        elif name == "trusted_proxies":
            items = raw if isinstance(raw, list | tuple) else str(raw).split(",")
            nets = parse_networks(str(i) for i in items)
            values[name] = tuple(str(n) for n in nets)
        elif name == "underscore_headers":
            if str(raw) not in ("drop", "allow"):
                raise ValueError(f"{var}: expected drop or allow, got {raw!r}")
            values[name] = str(raw)
        elif name == "idempotency_when_full":
            if str(raw) not in ("evict", "refuse"):
                raise ValueError(f"{var}: expected evict or refuse, got {raw!r}")
            values[name] = str(raw)
        else:
            values[name] = str(raw)
    values["kafka"] = kafka_from_sources(flags, env)
    settings = Settings(**values)  # type: ignore[arg-type]
    if settings.probes is not None and settings.probes[1] != 0:
        ports = {"listen": settings.listen[1], "admin": settings.admin[1]}
        clash = [name for name, port in ports.items() if port == settings.probes[1]]
        if clash:
            raise ValueError(f"probes: port {settings.probes[1]} is already the {clash[0]} port")
    if settings.workers > 1:
        _check_worker_ports(settings)
    return settings


def _check_worker_ports(settings: Settings) -> None:
    """With N workers, worker i serves the admin (and probes) port + i: those ranges must
    not cover another port payswitch listens on."""
    n = settings.workers
    if settings.listen[1] == 0:
        raise ValueError(
            f"workers: {n} workers need a fixed listen port to share; port 0 would give each "
            "its own random one"
        )
    spans = {"listen": (settings.listen[1], 1), "admin": (settings.admin[1], n)}
    if settings.probes is not None:
        spans["probes"] = (settings.probes[1], n)
    names = sorted(spans)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            (pa, na), (pb, nb) = spans[a], spans[b]
            if pa and pb and pa < pb + nb and pb < pa + na:
                raise ValueError(
                    f"workers: with {n} workers the {a} ports {pa}..{pa + na - 1} and the {b} "
                    f"ports {pb}..{pb + nb - 1} overlap (worker i serves admin and probes on "
                    "the port + i); move one of them"
                )
    for what, (port, count) in spans.items():
        if port and port + count - 1 > 65535:
            raise ValueError(f"workers: the {what} ports {port}..{port + count - 1} pass 65535")
