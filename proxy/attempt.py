"""One attempt of a request, and how a request ended: the values the retry loop keeps.

Owns: `Attempt` (one exchange with one gateway: how far it got, as the upstream client's
`Progress`, and how it ended, as an `End`), `Settled` (the answer or error a request ended
with), the process-wide bound on attempts kept open after their per-try timer, and reading
a gateway's Retry-After.
Must not: decide anything; proxy.retry_policy does, and proxy.retry applies it.
"""

from __future__ import annotations

import asyncio
import email.utils
import enum
import time
from typing import Literal

from proxy import errors
from proxy.config.model import Gateway
from proxy.forward import AttemptFailed, Reply
from proxy.upstream.phase import Progress
from proxy.upstream.state import GatewayState

ClientOutcome = Literal["success", "failure", "unknown"]
Result = Reply | AttemptFailed

#: How many abandoned attempts may be kept open across the process before new ones are
#: cancelled instead (their outcome then stays unknown and is reported as such).
MAX_ABANDONED = 1000


class End(enum.Enum):
    """How an attempt ended for its request (its phase says how far it got)."""

    ANSWERED = "answered"  # a definitive answer from the gateway
    UNSENT = "unsent"  # provably processed nothing: never connected, 429, not_processed
    AMBIGUOUS = "ambiguous"  # failed after the request may have reached the gateway
    ABANDONED = "abandoned"  # left running past its per-try timer or after another won


class Attempt:
    """One try of a request at one gateway (a plain class: built per try, see `Dispatch`)."""

    __slots__ = ("attempt_id", "end", "progress", "reported", "started", "state", "task")

    def __init__(
        self,
        attempt_id: str,
        state: GatewayState,
        started: float,
        progress: Progress,
        task: asyncio.Future[Result] | None = None,
        end: End | None = None,
    ) -> None:
        self.attempt_id = attempt_id
        self.state = state
        self.started = started
        self.progress = progress
        self.task = task  # a Task only when one is needed
        self.end = end  # None while the request still waits for it
        self.reported = False  # health and accounting saw its outcome

    def __repr__(self) -> str:
        return f"Attempt({self.attempt_id!r}, {self.state.name!r}, end={self.end})"

    @property
    def gateway(self) -> Gateway:
        return self.state.gateway

    @property
    def abandoned(self) -> bool:
        return self.end is End.ABANDONED

    @property
    def did_nothing(self) -> bool:
        """Provably processed nothing: it never counts as a possible charge."""
        return self.end is End.UNSENT

    @property
    def unresolved(self) -> bool:
        """May have reached the gateway, and no definitive answer is known."""
        return self.end is End.AMBIGUOUS or self.end is End.ABANDONED


class Settled:
    """How a request ended towards the gateways (a plain class: built per request)."""

    __slots__ = ("attempt", "attempts", "error", "reply", "tried", "unknown")

    def __init__(
        self,
        reply: Reply | None,
        attempt: Attempt | None,
        attempts: list[Attempt],
        tried: list[errors.Tried],
        error: errors.ProxyError | None = None,
        unknown: bool = False,
    ) -> None:
        self.reply = reply
        self.attempt = attempt
        self.attempts = attempts
        self.tried = tried
        self.error = error
        self.unknown = unknown  # a payment may have been taken and we do not know

    def __repr__(self) -> str:
        status = self.reply.status if self.reply is not None else None
        return f"Settled(status={status}, error={self.error!r}, unknown={self.unknown})"


class AbandonedBudget:
    """Counts abandoned attempts still open across the process, to bound them."""

    __slots__ = ("open",)

    def __init__(self) -> None:
        self.open = 0

    def track(self, task: asyncio.Future[Result]) -> None:
        self.open += 1
        task.add_done_callback(self._closed)

    def _closed(self, _task: asyncio.Future[Result]) -> None:
        self.open -= 1


ABANDONED = AbandonedBudget()


def retry_after(reply: Reply) -> float | None:
    raw = reply.headers.get("Retry-After")
    if raw is None:
        return None
    raw = raw.strip()
    if raw.isdigit():
        return float(raw)
    try:
        when = email.utils.parsedate_to_datetime(raw)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())
