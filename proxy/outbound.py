"""What a dispatch is built from: one request's value, and the parts every request shares.

Owns: `Outbound` (the request as the gateways will see it, with what payment safety needs
to know of it, built once per request) and `Parts` (balancer, health, forwarder, clock,
tracing and the attempt-event consumers, built once by the runtime).
Must not: hold per-attempt state (proxy.retry does) or build either value itself.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from multidict import CIMultiDict

from proxy.clock import Clock
from proxy.config.model import IDEMPOTENT_METHODS
from proxy.forward import Forwarder
from proxy.routing import RoutePlan
from proxy.tracing import Tracing
from proxy.upstream.balancer import Balancer
from proxy.upstream.health import Health
from proxy.upstream.state import GatewayState, Outcome

if TYPE_CHECKING:
    from proxy.attempt import Attempt, Result
    from proxy.retry import Dispatch

#: (gateway, attempt id) -> True when the key is still ours and the attempt is recorded.
NoteAttempt = Callable[[str, str], Awaitable[bool]]
#: An attempt ended (outcome as health sees it, seconds it took).
AttemptEnded = Callable[["Dispatch", "Attempt", Outcome, float], None]
#: An attempt left running ended after its request was answered.
LateResult = Callable[["Dispatch", "Attempt", "Result"], None]


class Outbound:
    """One request on its way to the gateways; never changed once built.

    A plain class, not a dataclass: a dataclass's generated `__init__` runs as interpreted
    Python even in the native build, and one of these is built per request."""

    __slots__ = (
        "attempt_header",
        "body",
        "forced_gateway",
        "has_key",
        "headers",
        "method",
        "note_attempt",
        "path_qs",
        "plan",
        "region",
        "states",
        "transaction_header",
        "transaction_id",
    )

    plan: Final[RoutePlan]
    region: Final[str]
    method: Final[str]
    path_qs: Final[str]
    headers: Final[CIMultiDict[str]]  # as forwarded; each attempt sends a copy with its id
    body: Final[bytes]
    transaction_id: Final[str]
    attempt_header: Final[str]
    transaction_header: Final[str]
    has_key: Final[bool]  # carries an idempotency key the provider can dedupe by
    forced_gateway: Final[str | None]  # an unresolved key goes back to the gateway that saw it
    states: Final[Mapping[str, GatewayState] | None]  # the gateways of the request's rules
    note_attempt: Final[NoteAttempt | None]  # recorded before each send of a keyed payment

    def __init__(
        self,
        *,
        plan: RoutePlan,
        region: str,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes,
        transaction_id: str,
        attempt_header: str,
        transaction_header: str,
        has_key: bool = False,
        forced_gateway: str | None = None,
        states: Mapping[str, GatewayState] | None = None,
        note_attempt: NoteAttempt | None = None,
    ) -> None:
        self.plan = plan
        self.region = region
        self.method = method
        self.path_qs = path_qs
        self.headers = headers
        self.body = body
        self.transaction_id = transaction_id
        self.attempt_header = attempt_header
        self.transaction_header = transaction_header
        self.has_key = has_key
        self.forced_gateway = forced_gateway
        self.states = states
        self.note_attempt = note_attempt

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS


@dataclass(frozen=True, slots=True, kw_only=True)
class Parts:
    """The long-lived parts a dispatch uses, shared by every request."""

    balancer: Balancer
    health: Health
    forwarder: Forwarder
    clock: Clock
    tracing: Tracing | None = None  # None when tracing is off: no span work at all
    attempt_ended: AttemptEnded | None = None
    late_result: LateResult | None = None
