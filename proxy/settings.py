"""Static process settings: fixed for the life of the process, unlike the rules.

Owns: `Settings` and how it is read from command-line flags and `PAYSWITCH_*` variables.
Must not: hold anything hot-reloaded; rules live in proxy.config.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

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
    admin_token: str | None = None
    access_log: bool = True
    events: str = "stdout"  # stdout | off | a file path
    events_min_severity: str = "info"
    webhook_url: str | None = None
    webhook_min_severity: str = "error"
    webhook_format: str = "event"  # event | alertmanager
    idempotency_store: str = "memory"  # memory | redis://host:port/db
    idempotency_prefix: str = "payswitch:"
    watch: bool = True
    shutdown_grace: float = 2.0  # readiness fails, traffic still served
    shutdown_deadline: float = 20.0  # in-flight requests get this long to finish
    log_level: str = "info"
    kafka: KafkaSettings | None = None  # off unless a bootstrap server is configured

    @property
    def admin_needs_token(self) -> bool:
        return not is_loopback(self.admin[0])


ENV = {
    "rules": "PAYSWITCH_RULES",
    "listen": "PAYSWITCH_LISTEN",
    "admin": "PAYSWITCH_ADMIN",
    "admin_token": "PAYSWITCH_ADMIN_TOKEN",
    "access_log": "PAYSWITCH_ACCESS_LOG",
    "events": "PAYSWITCH_EVENTS",
    "events_min_severity": "PAYSWITCH_EVENTS_MIN_SEVERITY",
    "webhook_url": "PAYSWITCH_WEBHOOK_URL",
    "webhook_min_severity": "PAYSWITCH_WEBHOOK_MIN_SEVERITY",
    "webhook_format": "PAYSWITCH_WEBHOOK_FORMAT",
    "idempotency_store": "PAYSWITCH_IDEMPOTENCY_STORE",
    "idempotency_prefix": "PAYSWITCH_IDEMPOTENCY_PREFIX",
    "watch": "PAYSWITCH_WATCH",
    "shutdown_grace": "PAYSWITCH_SHUTDOWN_GRACE",
    "shutdown_deadline": "PAYSWITCH_SHUTDOWN_DEADLINE",
    "log_level": "PAYSWITCH_LOG_LEVEL",
}


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected on/off, got {text!r}")


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
        elif name in ("listen", "admin"):
            values[name] = parse_hostport(str(raw), what=name)
        elif name in ("access_log", "watch"):
            values[name] = raw if isinstance(raw, bool) else _bool(str(raw))
        elif name in ("shutdown_grace", "shutdown_deadline"):
            values[name] = float(str(raw))
        else:
            values[name] = str(raw)
    values["kafka"] = kafka_from_sources(flags, env)
    return Settings(**values)  # type: ignore[arg-type]
