"""Typed events with a stable JSON shape (schemas/event.schema.json).

Owns: `Severity`, the `Emitter` protocol every producer depends on, and the event bus.
Must not: block request handling; a slow or failing sink drops, never waits.
"""

from __future__ import annotations

import enum
from typing import Protocol


class Severity(enum.IntEnum):
    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40
    CRITICAL = 50


class Emitter(Protocol):
    def emit(self, kind: str, severity: Severity, /, **fields: object) -> None:
        """Record an event; never raises, never blocks."""
        ...


class NullEmitter:
    __slots__ = ()

    def emit(self, kind: str, severity: Severity, /, **fields: object) -> None:
        return None
