"""Per-gateway runtime state, keyed by gateway identity so it survives rule reloads.

Owns: `GatewayState` (flags written by health sources, in-flight count, latency and outcome
counters) and `StateRegistry`, which reconciles states with each new rules snapshot.
Must not: choose gateways (the balancer reads states) or run timers (health sources do).
Health sources write flags through `set_flag`/`clear_flag`; nothing else writes them.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Final

from proxy.config.model import Gateway

logger = logging.getLogger(__name__)


class Flag(enum.IntFlag):
    NONE = 0
    ACTIVE_FAILED = enum.auto()  # active health checks say down
    EJECTED = enum.auto()  # passive outlier detection ejected it
    DEGRADED = enum.auto()  # predictive: drifting above its baseline (still eligible)
    DRAINING = enum.auto()  # an operator drained it
    THROTTLED = enum.auto()  # it answered 429; backing off for Retry-After


#: Flags that make a gateway ineligible for new requests. DEGRADED only lowers its score.
BLOCKING = Flag.ACTIVE_FAILED | Flag.EJECTED | Flag.DRAINING | Flag.THROTTLED
#: Single flags as plain ints, to test `GatewayState.bits` with.
DRAINING_BIT: Final = int(Flag.DRAINING)
DEGRADED_BIT: Final = int(Flag.DEGRADED)
THROTTLED_BIT: Final = int(Flag.THROTTLED)


class Outcome(enum.Enum):
    """What one attempt told us about the gateway's health."""

    SUCCESS = "success"  # any definitive answer the gateway owns (2xx-4xx except 429)
    CONNECT_FAILURE = "connect-failure"  # spelled as in the rules (retry.on)
    TIMEOUT = "timeout"
    RESET = "reset"
    BAD_RESPONSE = "bad-response"  # invalid HTTP
    SERVER_ERROR = "server-error"  # 5xx
    THROTTLED = "throttled"  # 429: a rate signal, not a health failure
    CANCELLED = "cancelled"  # we gave up on it (client left, another attempt won)
    LOCAL = (
        "local_failure"  # payswitch's own limit (descriptors, connection cap): not the gateway's
    )

    # A plain attribute set once per member (below the class): read three times per
    # answer, where a property and a set lookup would cost two Python calls each (an Enum
    # hashes through Python code). Not set in an `__init__`: the native build (mypyc)
    # cannot compile an Enum's.
    is_failure: bool


#: The outcomes that count against a gateway's health.
_FAILURES = frozenset(
    {
        Outcome.CONNECT_FAILURE,
        Outcome.TIMEOUT,
        Outcome.RESET,
        Outcome.BAD_RESPONSE,
        Outcome.SERVER_ERROR,
    }
)
for _outcome in Outcome:
    _outcome.is_failure = _outcome in _FAILURES
del _outcome


@dataclass(frozen=True, slots=True)
class FlagChange:
    gateway: str
    flag: Flag
    set: bool
    reason: str


class GatewayState:
    """Mutable runtime facts about one gateway. Only the event loop thread touches it."""

    __slots__ = (
        "_listeners",
        "bits",
        "ewma_at",
        "ewma_latency",
        "failures",
        "flags",
        "gateway",
        "in_flight",
        "name",
        "overlay",
        "probe_due",
        "requests",
        "score",
        "silent",
        "throttled_until",
        "weight_factor",
        "weight_override",
    )

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        #: The gateway's name, which is its key: a reload swaps `gateway` only for one of
        #: the same name. An attribute, as it is read several times per request.
        self.name: str = gateway.name
        self.flags = Flag.NONE
        #: `flags` as a plain int, for the tests made per request: `&` on an enum flag runs
        #: enum's interpreted `__and__` and builds a member; on two ints it is one operation.
        self.bits = 0
        self.score = 1.0  # predictive health score in (0, 1]
        self.weight_factor = 1.0  # slow-start ramp in (0, 1]
        #: Half-open with its probe slot free: the balancer picks it first, so the probe
        #: goes out at once instead of when round robin comes around to it.
        self.probe_due = False
        #: Requests wait on it and it answered none for several times its usual latency:
        #: the balancer passes it over while another gateway can take the request.
        self.silent = False
        self.in_flight = 0
        self.requests = 0
        self.failures = 0
        self.ewma_latency = 0.0
        #: When `ewma_latency` last took an answer's latency (clock seconds).
        self.ewma_at = 0.0
        self.throttled_until = 0.0
        # A control command in force on this gateway (who, what, until when), and the weight
        # it sets in place of the rules' weight; both written only by proxy.kafka.overlay.
        self.overlay: dict[str, object] | None = None
        self.weight_override: float | None = None
        self._listeners: list[Callable[[GatewayState, FlagChange], None]] = []

    @property
    def blocked(self) -> bool:
        return bool(self.flags & BLOCKING)

    def effective_weight(self) -> float:
        weight = self.gateway.weight if self.weight_override is None else self.weight_override
        return weight * self.score * self.weight_factor

    def subscribe(self, listener: Callable[[GatewayState, FlagChange], None]) -> None:
        self._listeners.append(listener)

    def set_flag(self, flag: Flag, reason: str) -> None:
        if self.flags & flag:
            return
        self.flags |= flag
        self.bits = int(self.flags)
        self._notify(FlagChange(self.name, flag, True, reason))

    def clear_flag(self, flag: Flag, reason: str) -> None:
        if not self.flags & flag:
            return
        self.flags &= ~flag
        self.bits = int(self.flags)
        self._notify(FlagChange(self.name, flag, False, reason))

    def _notify(self, change: FlagChange) -> None:
        for listener in self._listeners:
            try:
                listener(self, change)
            except Exception:
                logger.exception("flag listener failed for %s", self.name)

    def describe(self) -> dict[str, object]:
        return {
            "name": self.name,
            "url": self.gateway.url,
            "region": self.gateway.region,
            "provider": self.gateway.provider,
            "flags": [f.name.lower() for f in Flag if f and f in self.flags and f.name],
            "score": round(self.score, 4),
            "weight": self.gateway.weight,
            "effective_weight": round(self.effective_weight(), 4),
            "in_flight": self.in_flight,
            "requests": self.requests,
            "failures": self.failures,
            "ewma_latency_ms": round(self.ewma_latency * 1000, 3),
            "overlay": self.overlay,
        }


class StateRegistry:
    """All gateways' states; reconciled with every new rules snapshot by identity."""

    def __init__(self, on_create: Callable[[GatewayState], None] | None = None) -> None:
        self._states: dict[str, GatewayState] = {}
        self._on_create = on_create

    def __getitem__(self, name: str) -> GatewayState:
        return self._states[name]

    def get(self, name: str) -> GatewayState | None:
        return self._states.get(name)

    def __iter__(self) -> Iterator[GatewayState]:
        return iter(list(self._states.values()))

    def values(self) -> list[GatewayState]:
        return list(self._states.values())

    def reconcile(
        self, gateways: Mapping[str, Gateway]
    ) -> tuple[list[GatewayState], list[GatewayState]]:
        """Keep states whose identity is unchanged (refreshing their config), create new
        ones, drop removed ones. Returns (created, removed) so callers start/stop tasks."""
        created: list[GatewayState] = []
        removed: list[GatewayState] = []
        fresh: dict[str, GatewayState] = {}
        for name, gw in gateways.items():
            old = self._states.get(name)
            if old is not None and old.gateway.identity == gw.identity:
                old.gateway = gw
                fresh[name] = old
            else:
                st = GatewayState(gw)
                fresh[name] = st
                created.append(st)
                if old is not None:
                    removed.append(old)
                if self._on_create is not None:
                    self._on_create(st)
        for name, old in self._states.items():
            if name not in gateways:
                removed.append(old)
        self._states = fresh
        return created, removed
