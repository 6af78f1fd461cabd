"""One attempt of a request, and how a request ended: the values the retry loop keeps.

Owns: `Attempt` (one exchange with one gateway and what is known of it), `Settled` (the
answer or error a request ended with), the process-wide bound on attempts kept open after
their per-try timer, and reading a gateway's Retry-After.
Must not: decide anything; proxy.retry does.
"""

from __future__ import annotations

import asyncio
import email.utils
import time
from dataclasses import dataclass
from typing import Literal

from proxy import errors
from proxy.config.model import Gateway
from proxy.forward import AttemptFailed, Reply
from proxy.upstream.state import GatewayState

ClientOutcome = Literal["success", "failure", "unknown"]
Result = Reply | AttemptFailed

#: How many abandoned attempts may be kept open across the process before new ones are
#: cancelled instead (their outcome then stays unknown and is reported as such).
MAX_ABANDONED = 1000


@dataclass(slots=True, eq=False)
class Attempt:
    attempt_id: str
    state: GatewayState
    started: float
    task: asyncio.Future[Result] | None = None  # a Task only when one is needed
    abandoned: bool = False
    reported: bool = False
    sent_unresolved: bool = False  # may have reached the gateway; outcome not yet known
    did_nothing: bool = False  # provably not processed: refused connection, 429, not_processed

    @property
    def gateway(self) -> Gateway:
        return self.state.gateway


@dataclass(slots=True)
class Settled:
    """How a request ended towards the gateways."""

    reply: Reply | None
    attempt: Attempt | None
    attempts: list[Attempt]
    tried: list[errors.Tried]
    error: errors.ProxyError | None = None
    unknown: bool = False  # a payment may have been taken and we do not know


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
