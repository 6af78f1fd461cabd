"""Whether the idempotency store answers, and saying so once per change.

Owns: `StoreGuard`: the store's up/down state as the request path last saw it, one log line
and one `store.down` / `store.up` event per change (never one per failed request), the
`payswitch_idempotency_store_up` gauge and error counter, and a probe that notices the
store is back when no request has tried it.
Must not: decide what a request does while the store is down (payments.py does, by the
route's `on_store_down`), or retry store calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge

from proxy.aio import spawn

if TYPE_CHECKING:
    from proxy.events import Emitter

logger = logging.getLogger(__name__)

#: Seconds between two probes of a store that is down. Requests do not try a store that
#: is down, so this is also how long one transient failure keeps keyed payments off it.
PROBE_EVERY = 0.25
#: A store that fails again within `FLAP_WINDOW` seconds of coming back (it answers the
#: probe's PING but not writes, say) is probed half as often each time, down to once per
#: `PROBE_MAX` seconds, so it is said a few times rather than four times a second.
FLAP_WINDOW = 2.0
PROBE_MAX = 5.0


class StoreGuard:
    def __init__(
        self,
        ping: Callable[[], Awaitable[object]],
        *,
        registry: CollectorRegistry,
        events: Emitter | None = None,
        probe_every: float = PROBE_EVERY,
    ) -> None:
        self._ping = ping
        self._events = events
        self._probe_every = probe_every
        self._probe: asyncio.Task[None] | None = None
        self._interval = probe_every
        self._up_since = 0.0
        self._closed = False
        self.up = True
        #: Outages seen so far: lets callers say something once per outage.
        self.outages = 0
        self.last_error: str | None = None
        self._down_since = 0.0
        self._up = Gauge(
            "payswitch_idempotency_store_up",
            "1 while the idempotency store answers, 0 while it does not.",
            registry=registry,
        )
        self._up.set(1)
        self._errors = Counter(
            "payswitch_idempotency_store_errors",
            "Idempotency store calls that failed, or were not tried while it was down, by operation.",
            ("op",),
            registry=registry,
        )

    def failed(self, op: str, exc: BaseException) -> None:
        """A store call failed: count it; on the first failure say so and start probing."""
        self._errors.labels(op).inc()
        self.last_error = f"{type(exc).__name__}: {exc}"[:300]
        if not self.up:
            self._ensure_probe()
            return
        self.up = False
        self.outages += 1
        now = time.monotonic()
        flapping = self.outages > 1 and now - self._up_since < FLAP_WINDOW
        self._interval = min(self._interval * 2, PROBE_MAX) if flapping else self._probe_every
        self._down_since = now
        self._up.set(0)
        # The traceback once per outage: what the store said, without one per request.
        logger.error("idempotency store down (%s failed: %s)", op, self.last_error, exc_info=exc)
        if self._events is not None:
            from proxy.events import Severity

            self._events.emit("store.down", Severity.CRITICAL, op=op, error=self.last_error)
        self._ensure_probe()

    def skipped(self, op: str) -> None:
        """A store call not tried because the store is down: counted as failed."""
        self._errors.labels(op).inc()
        self._ensure_probe()

    def _ensure_probe(self) -> None:
        """Requests do not try a store that is down: the probe is the only way back up, so
        one that ended (cancelled, or killed by what it did not expect) is started again."""
        if self.up or self._closed:
            return
        if self._probe is None or self._probe.done():
            self._probe = spawn(self._probe_until_up(), name="idempotency-store-probe")

    def succeeded(self) -> None:
        if self.up:
            return
        self.up = True
        self._up_since = time.monotonic()
        self._up.set(1)
        logger.warning("idempotency store up again")
        if self._events is not None:
            from proxy.events import Severity

            down_s = round(time.monotonic() - self._down_since, 3)
            self._events.emit("store.up", Severity.INFO, down_s=down_s)

    async def _probe_until_up(self) -> None:
        while not self.up:
            await asyncio.sleep(self._interval)
            try:
                await self._ping()
            except Exception as exc:
                self._errors.labels("ping").inc()
                self.last_error = f"{type(exc).__name__}: {exc}"[:300]
                continue
            self.succeeded()

    async def close(self) -> None:
        self._closed = True
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._probe
