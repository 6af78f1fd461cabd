"""How far one exchange with a gateway got: the fact payment safety is decided on.

Owns: `Phase` (connecting → writing → sent → answered) and `Progress`, the one mutable
cell an exchange advances as it goes, so whoever waits on it can tell at any moment —
including when a per-try timer fires — whether any byte could have reached the gateway —
and, through its `waker`, learn that the outcome is in without a turn of the loop.
Must not: decide what a phase means for retries (proxy.retry does) or do I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Callable


class Phase(enum.IntEnum):
    """Ordered: a later phase implies every earlier one happened."""

    CONNECTING = 0  # no connection yet: nothing can have reached the gateway
    WRITING = 1  # connected, the request is being written: the gateway may read part of it
    SENT = 2  # the whole request was handed to the socket
    ANSWERED = 3  # a response head arrived


class Progress:
    """The live phase of one exchange; the upstream client advances it, never backwards."""

    __slots__ = ("phase", "waker")

    def __init__(self) -> None:
        self.phase = Phase.CONNECTING
        # Called by the upstream connection right after it sets the exchange's outcome,
        # while someone waits for it (proxy.aio.first_done). The future's own callbacks
        # run a turn of the loop later; this only makes the waiter's wake-up come sooner.
        self.waker: Callable[[], None] | None = None

    def advance(self, phase: Phase) -> None:
        if phase > self.phase:
            self.phase = phase

    @property
    def reached_gateway(self) -> bool:
        """Could any byte of the request have reached the gateway?"""
        return self.phase >= Phase.WRITING
