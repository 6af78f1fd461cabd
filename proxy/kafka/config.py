"""Static Kafka settings: where the brokers are, which topics, how to authenticate.

Owns: `KafkaSettings`, how it is read from `run` flags and `PAYSWITCH_KAFKA_*` variables,
the `run` flags themselves, and the connection keyword arguments shared by the producer and
the consumers (TLS and SASL settings are passed through to aiokafka untouched).
Must not: connect to anything; the sink and the consumers do.
"""

from __future__ import annotations

import argparse
import os
import re
import ssl
from collections.abc import Mapping
from dataclasses import dataclass

from proxy.config.units import parse_size

SECURITY_PROTOCOLS = ("PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL")
SASL_MECHANISMS = ("PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512")
SEVERITIES = ("debug", "info", "warning", "error", "critical")
_TOPIC = re.compile(r"^[A-Za-z0-9._-]{1,249}$")


@dataclass(frozen=True, slots=True, kw_only=True)
class KafkaSettings:
    bootstrap: tuple[str, ...]
    client_id: str = "payswitch"
    transactions_topic: str = "payswitch.transactions"
    events_topic: str = "payswitch.events"
    control_topic: str = "payswitch.control"
    control: bool = True  # consume the control topic and apply its commands
    create_topics: bool = True  # create missing topics (compacted where they should be)
    min_severity: str = "info"
    buffer: int = 20_000  # records held in memory while the broker is away
    spill_path: str = "payswitch-kafka-spill.jsonl"
    spill_max_bytes: int = 64 * 1024 * 1024
    security_protocol: str = "PLAINTEXT"
    sasl_mechanism: str | None = None
    sasl_username: str | None = None
    sasl_password: str | None = None
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None

    def connection(self) -> dict[str, object]:
        """Keyword arguments every aiokafka client of ours takes."""
        kw: dict[str, object] = {
            "bootstrap_servers": list(self.bootstrap),
            "client_id": self.client_id,
            "security_protocol": self.security_protocol,
        }
        if self.security_protocol in ("SSL", "SASL_SSL"):
            ctx = ssl.create_default_context(cafile=self.ssl_cafile)
            if self.ssl_certfile:
                ctx.load_cert_chain(self.ssl_certfile, self.ssl_keyfile)
            kw["ssl_context"] = ctx
        if self.security_protocol.startswith("SASL"):
            kw["sasl_mechanism"] = self.sasl_mechanism or "PLAIN"
            kw["sasl_plain_username"] = self.sasl_username
            kw["sasl_plain_password"] = self.sasl_password
        return kw


#: field -> (flag dest, environment variable). The SASL password has no flag: a flag shows
#: in `ps` to every user of the machine.
ENV: Mapping[str, str] = {
    "bootstrap": "PAYSWITCH_KAFKA_BOOTSTRAP",
    "client_id": "PAYSWITCH_KAFKA_CLIENT_ID",
    "transactions_topic": "PAYSWITCH_KAFKA_TRANSACTIONS_TOPIC",
    "events_topic": "PAYSWITCH_KAFKA_EVENTS_TOPIC",
    "control_topic": "PAYSWITCH_KAFKA_CONTROL_TOPIC",
    "control": "PAYSWITCH_KAFKA_CONTROL",
    "create_topics": "PAYSWITCH_KAFKA_CREATE_TOPICS",
    "min_severity": "PAYSWITCH_KAFKA_MIN_SEVERITY",
    "buffer": "PAYSWITCH_KAFKA_BUFFER",
    "spill_path": "PAYSWITCH_KAFKA_SPILL",
    "spill_max_bytes": "PAYSWITCH_KAFKA_SPILL_MAX",
    "security_protocol": "PAYSWITCH_KAFKA_SECURITY_PROTOCOL",
    "sasl_mechanism": "PAYSWITCH_KAFKA_SASL_MECHANISM",
    "sasl_username": "PAYSWITCH_KAFKA_SASL_USERNAME",
    "sasl_password": "PAYSWITCH_KAFKA_SASL_PASSWORD",
    "ssl_cafile": "PAYSWITCH_KAFKA_SSL_CAFILE",
    "ssl_certfile": "PAYSWITCH_KAFKA_SSL_CERTFILE",
    "ssl_keyfile": "PAYSWITCH_KAFKA_SSL_KEYFILE",
}


def add_arguments(parser: argparse.ArgumentParser, *, connection_only: bool = False) -> None:
    """The `run` flags (or, for `tail`, those saying where and how to connect); each also
    has the environment variable named in ENV."""
    g = parser.add_argument_group("kafka (off unless a bootstrap server is given)")
    g.add_argument("--kafka-bootstrap", dest="kafka_bootstrap", help="HOST:PORT[,HOST:PORT...]")
    g.add_argument("--kafka-client-id", dest="kafka_client_id")
    g.add_argument("--kafka-transactions-topic", dest="kafka_transactions_topic")
    g.add_argument("--kafka-events-topic", dest="kafka_events_topic")
    _add_security(g)
    if connection_only:
        return
    g.add_argument("--kafka-control-topic", dest="kafka_control_topic")
    g.add_argument("--kafka-control", dest="kafka_control", choices=["on", "off"])
    g.add_argument("--kafka-create-topics", dest="kafka_create_topics", choices=["on", "off"])
    g.add_argument("--kafka-min-severity", dest="kafka_min_severity", choices=SEVERITIES)
    g.add_argument(
        "--kafka-buffer", dest="kafka_buffer", help="records held while the broker is away"
    )
    g.add_argument("--kafka-spill", dest="kafka_spill_path", help="file critical records spill to")
    g.add_argument("--kafka-spill-max", dest="kafka_spill_max_bytes", help="e.g. 64MiB")


def _add_security(g: argparse._ArgumentGroup) -> None:
    g.add_argument(
        "--kafka-security-protocol", dest="kafka_security_protocol", choices=SECURITY_PROTOCOLS
    )
    g.add_argument("--kafka-sasl-mechanism", dest="kafka_sasl_mechanism", choices=SASL_MECHANISMS)
    g.add_argument("--kafka-sasl-username", dest="kafka_sasl_username")
    g.add_argument("--kafka-ssl-cafile", dest="kafka_ssl_cafile")
    g.add_argument("--kafka-ssl-certfile", dest="kafka_ssl_certfile")
    g.add_argument("--kafka-ssl-keyfile", dest="kafka_ssl_keyfile")


def _on_off(text: str, what: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{what}: expected on/off, got {text!r}")


def _one(name: str, raw: str) -> object:
    what = "kafka " + name.replace("_", "-")
    if name == "bootstrap":
        servers = tuple(s.strip() for s in raw.split(",") if s.strip())
        for s in servers:
            host, sep, port = s.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{what}: expected HOST:PORT[,HOST:PORT...], got {raw!r}")
        return servers
    if name in ("control", "create_topics"):
        return _on_off(raw, what)
    if name == "buffer":
        if not raw.strip().isdigit() or int(raw) < 1:
            raise ValueError(f"{what}: expected a positive number of records, got {raw!r}")
        return int(raw)
    if name == "spill_max_bytes":
        return parse_size(raw)
    if name.endswith("_topic") and not _TOPIC.match(raw):
        raise ValueError(f"{what}: {raw!r} is not a valid topic name")
    if name == "min_severity" and raw.lower() not in SEVERITIES:
        raise ValueError(f"{what}: expected one of {', '.join(SEVERITIES)}, got {raw!r}")
    if name == "security_protocol" and raw.upper() not in SECURITY_PROTOCOLS:
        raise ValueError(f"{what}: expected one of {', '.join(SECURITY_PROTOCOLS)}")
    if name == "sasl_mechanism" and raw.upper() not in SASL_MECHANISMS:
        raise ValueError(f"{what}: expected one of {', '.join(SASL_MECHANISMS)}")
    if name in ("security_protocol", "sasl_mechanism"):
        return raw.upper()
    if name == "min_severity":
        return raw.lower()
    return raw


def from_sources(
    flags: Mapping[str, object | None], env: Mapping[str, str] = os.environ
) -> KafkaSettings | None:
    """Kafka settings from `kafka_*` flags, then PAYSWITCH_KAFKA_* variables, then defaults;
    None when no bootstrap server is configured. Raises ValueError naming the bad value."""
    values: dict[str, object] = {}
    for name, var in ENV.items():
        raw = flags.get("kafka_" + name)
        if raw is None:
            raw = env.get(var)
        if raw is None or raw == "":
            continue
        values[name] = _one(name, str(raw))
    if not values.get("bootstrap"):
        if len(values) > 0:
            raise ValueError(
                f"kafka settings given without a bootstrap server ({ENV['bootstrap']})"
            )
        return None
    protocol = values.get("security_protocol", "PLAINTEXT")
    if str(protocol).startswith("SASL") and not values.get("sasl_username"):
        raise ValueError(f"kafka security protocol {protocol} needs a SASL username")
    return KafkaSettings(**values)  # type: ignore[arg-type]
