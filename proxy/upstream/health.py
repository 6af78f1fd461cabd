"""The health façade the request path talks to: admission, attempt start and end.

Owns: `Health`, which turns attempt outcomes into gateway state (counters, latency EWMA)
and answers whether a gateway may take a request now.
Must not: pick gateways or speak HTTP to clients.
"""

from __future__ import annotations

from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.events import Emitter, NullEmitter
from proxy.upstream.state import GatewayState, Outcome, StateRegistry

_EWMA_ALPHA = 0.2


class Health:
    def __init__(
        self, registry: StateRegistry, *, clock: Clock = SYSTEM_CLOCK, events: Emitter | None = None
    ) -> None:
        self.registry = registry
        self.clock = clock
        self.events: Emitter = events or NullEmitter()

    def admit(self, st: GatewayState, now: float) -> str | None:
        """None when `st` may take a request now, else the reason it may not."""
        if st.blocked:
            return st.flags.name.lower() if st.flags.name else "blocked"
        return None

    def started(self, st: GatewayState, now: float) -> None:
        st.in_flight += 1
        st.requests += 1

    def finished(
        self,
        st: GatewayState,
        outcome: Outcome,
        latency: float,
        now: float,
        retry_after: float | None = None,
    ) -> None:
        st.in_flight -= 1
        if outcome is Outcome.CANCELLED:
            return
        if outcome.is_failure:
            st.failures += 1
        st.ewma_latency = (
            latency
            if st.ewma_latency == 0
            else st.ewma_latency + _EWMA_ALPHA * (latency - st.ewma_latency)
        )

    def reconcile(self, created: list[GatewayState], removed: list[GatewayState]) -> None:
        """Start what new gateways need (active checks), stop what removed ones had."""

    async def start(self) -> None:
        return None

    async def close(self) -> None:
        return None
