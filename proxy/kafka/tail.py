"""`payswitch tail`: follow payswitch.transactions and payswitch.events, readably.

Owns: the `tail` command: its flags, the filters (route, gateway, least severity,
transaction id), one line per record for people (or the record's JSON with `--json`).
Reads without a consumer group, so it never takes records from anyone else.
Must not: write to Kafka or to payswitch; it only reads.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import IO

import orjson

from proxy.kafka.config import SEVERITIES, KafkaSettings, add_arguments, from_sources

#: Fields shown first and unlabelled-by-order; the rest follow as key=value.
_FIRST = ("transaction_id", "route", "gateway", "target", "status", "attempts", "duration_ms")
_RANK = {name: i for i, name in enumerate(SEVERITIES)}
_COLOURS = {"warning": "\033[33m", "error": "\033[31m", "critical": "\033[1;31m"}


@dataclass(frozen=True, slots=True, kw_only=True)
class Filters:
    route: str | None = None
    gateway: str | None = None
    severity: str = "debug"
    transaction: str | None = None

    def match(self, event: Mapping[str, object]) -> bool:
        fields = event.get("fields")
        if not isinstance(fields, Mapping):
            return False
        if _RANK.get(str(event.get("severity")), 0) < _RANK[self.severity]:
            return False
        if self.transaction is not None and fields.get("transaction_id") != self.transaction:
            return False
        if self.route is not None and self.route not in _about(fields, "route"):
            return False
        return self.gateway is None or self.gateway in _about(fields, "gateway")


def _about(fields: Mapping[str, object], what: str) -> set[str]:
    """Every `what` (route or gateway) an event's fields name."""
    names = set()
    value = fields.get(what)
    if isinstance(value, str):
        names.add(value)
    target = fields.get("target") or fields.get("key")
    if isinstance(target, str) and target.startswith(what + "/"):
        names.add(target.partition("/")[2])
    if what == "gateway":
        attempts = fields.get("attempts")
        for att in attempts if isinstance(attempts, list) else ():
            if isinstance(att, Mapping) and isinstance(att.get("gateway"), str):
                names.add(att["gateway"])
        reasons = fields.get("reasons")
        if isinstance(reasons, Mapping):
            names.update(str(k) for k in reasons)
    return names


def _text(value: object) -> str:
    if isinstance(value, str):
        return value if value and " " not in value else orjson.dumps(value).decode()
    return orjson.dumps(value).decode()


def format_event(event: Mapping[str, object], *, colour: bool = False) -> str:
    """One line: time, severity, kind, then the fields that say what happened."""
    fields = event.get("fields")
    fields = fields if isinstance(fields, Mapping) else {}
    severity = str(event.get("severity", "?"))
    parts = [str(event.get("time", "?")), f"{severity.upper():<8}", f"{event.get('kind', '?'):<26}"]
    shown = [k for k in _FIRST if k in fields] + sorted(k for k in fields if k not in _FIRST)
    for k in shown:
        v = fields[k]
        if v is None:
            continue
        parts.append(f"{k}={_text(v)}{'ms' if k == 'duration_ms' else ''}")
    line = " ".join(parts)
    if colour and severity in _COLOURS:
        return f"{_COLOURS[severity]}{line}\033[0m"
    return line


def add_parser(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("tail", help="follow payswitch.transactions and payswitch.events, readably")
    add_arguments(p, connection_only=True)
    p.add_argument("--route", help="only events about this route")
    p.add_argument("--gateway", help="only events about this gateway")
    p.add_argument("--severity", choices=SEVERITIES, default="debug", help="least severity")
    p.add_argument("--transaction", help="only this transaction id")
    p.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    p.add_argument("--json", action="store_true", help="print each record's JSON as it is")
    p.add_argument("--max", type=int, default=0, help="stop after this many records (0: never)")


def main(args: argparse.Namespace) -> int:
    try:
        settings = from_sources(vars(args))
    except ValueError as exc:
        print(f"payswitch tail: {exc}", file=sys.stderr)
        return 2
    if settings is None:
        print(
            "payswitch tail: no Kafka bootstrap server; use --kafka-bootstrap or "
            "PAYSWITCH_KAFKA_BOOTSTRAP",
            file=sys.stderr,
        )
        return 2
    filters = Filters(
        route=args.route, gateway=args.gateway, severity=args.severity, transaction=args.transaction
    )
    try:
        return asyncio.run(
            follow(settings, filters, from_beginning=args.from_beginning, raw=args.json,
                   limit=args.max)
        )  # fmt: skip
    except KeyboardInterrupt:
        return 0


async def follow(
    settings: KafkaSettings,
    filters: Filters,
    *,
    from_beginning: bool = False,
    raw: bool = False,
    limit: int = 0,
    out: IO[str] | None = None,
    topics: Sequence[str] | None = None,
) -> int:
    from aiokafka import AIOKafkaConsumer
    from aiokafka.errors import KafkaError

    out = out or sys.stdout
    colour = not raw and out.isatty()
    consumer = AIOKafkaConsumer(
        **settings.connection(),
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
    )
    try:
        await consumer.start()
    except KafkaError as exc:
        print(
            f"payswitch tail: cannot reach {','.join(settings.bootstrap)}: {exc}", file=sys.stderr
        )
        return 1
    printed = 0
    try:
        consumer.subscribe(
            topics=list(topics or (settings.transactions_topic, settings.events_topic))
        )
        async for rec in consumer:
            try:
                event = orjson.loads(rec.value)
            except (orjson.JSONDecodeError, TypeError):
                print(f"(not JSON: {rec.topic}/{rec.partition}@{rec.offset})", file=sys.stderr)
                continue
            if not isinstance(event, dict) or not filters.match(event):
                continue
            print(rec.value.decode() if raw else format_event(event, colour=colour), file=out)
            out.flush()
            printed += 1
            if limit and printed >= limit:
                break
    finally:
        await consumer.stop()
    return 0
