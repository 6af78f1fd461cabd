"""Back-office commands read from `payswitch.control`: parsing and validation.

Owns: `Command` and `parse_command`, which turns one record (key, value) into a Command or
raises `CommandError` saying exactly what is wrong: not JSON, refused by
schemas/control.schema.json (one validator, built once), key and target disagreeing, an
expiry in the past or more than `MAX_AHEAD` away.
Must not: apply anything or know about gateways' state; proxy.kafka.overlay does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache

import jsonschema
import orjson

from proxy.config.load import schema_dir

#: A command may not reach further ahead than this: a forgotten override must end.
MAX_AHEAD = 7 * 24 * 3600.0
MAX_VALUE_BYTES = 16 * 1024


class CommandError(ValueError):
    """A control record that must change nothing; the message says why."""


class CommandExpired(CommandError):
    """A well-formed command whose expiry has passed."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Command:
    target: str  # gateway/NAME or route/NAME, as the record key
    kind: str  # gateway | route
    name: str
    action: str  # drain | undrain | weight | disable | enable
    weight: float | None
    issuer: str
    reason: str
    expires_at: float  # unix seconds
    expires_text: str  # as written, for people

    @property
    def lifts(self) -> bool:
        """An undrain or enable only removes whatever overlay the target had."""
        return self.action in ("undrain", "enable")

    def describe(self) -> dict[str, object]:
        out: dict[str, object] = {
            "target": self.target,
            "action": self.action,
            "issuer": self.issuer,
            "reason": self.reason,
            "expires_at": self.expires_text,
        }
        if self.weight is not None:
            out["weight"] = self.weight
        return out


@cache
def _validator() -> jsonschema.protocols.Validator:
    schema = json.loads((schema_dir() / "control.schema.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    validator: jsonschema.protocols.Validator = cls(schema)
    return validator


def _where(err: jsonschema.ValidationError) -> str:
    path = "/".join(str(p) for p in err.absolute_path)
    return f"/{path}: " if path else ""


def parse_command(key: bytes | None, value: bytes, now: float) -> Command:
    """The command in one control record; `now` is wall-clock unix seconds."""
    if key is None:
        raise CommandError("record has no key; the key must be the command's target")
    try:
        key_text = key.decode()
    except UnicodeDecodeError:
        raise CommandError("record key is not UTF-8") from None
    if len(value) > MAX_VALUE_BYTES:
        raise CommandError(f"command is {len(value)} bytes; at most {MAX_VALUE_BYTES} allowed")
    try:
        doc = orjson.loads(value)
    except orjson.JSONDecodeError as exc:
        raise CommandError(f"command is not JSON: {exc}") from None
    errors = sorted(_validator().iter_errors(doc), key=lambda e: list(e.absolute_path))
    if errors:
        raise CommandError("; ".join(f"{_where(e)}{e.message}" for e in errors[:5]))
    assert isinstance(doc, dict)
    target = str(doc["target"])
    if target != key_text:
        raise CommandError(f"target {target!r} does not match the record key {key_text!r}")
    text = str(doc["expires_at"])
    try:
        expires = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise CommandError(f"/expires_at: {exc}") from None
    if expires <= now:
        raise CommandExpired(f"/expires_at: {text} has already passed")
    if expires - now > MAX_AHEAD:
        raise CommandError(f"/expires_at: {text} is more than 7 days ahead")
    kind, _, name = target.partition("/")
    weight = doc.get("weight")
    return Command(
        target=target,
        kind=kind,
        name=name,
        action=str(doc["action"]),
        weight=float(weight) if weight is not None else None,
        issuer=str(doc["issuer"]),
        reason=str(doc["reason"]),
        expires_at=expires,
        expires_text=text,
    )
