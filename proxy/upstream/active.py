"""Active HTTP health checks of one gateway.

Owns: `ActiveChecker`, which probes `{scheme}://{host}:{port}{base_path}{path}` on an
interval (with a little jitter so sidecars do not probe in lockstep) and owns the
ACTIVE_FAILED flag: `unhealthy_threshold` failures in a row set it, `healthy_threshold`
successes in a row clear it, so one lost probe never flaps a gateway. A gateway that fails
again before it has stayed up for a calm period needs twice as many passes each time
(capped), so one flapping slower than the thresholds is not let back on every up phase.
A 429 to a probe counts neither way. While the gateway is failing, it is probed twice as
often, so its return is noticed sooner (as Envoy's `unhealthy_interval`); the probes cost
only the checker, never a request.
Probes go through payswitch's own upstream client (a GET of a few bytes does not need a
generic HTTP stack), with the gateway's TLS settings: a probe verifies the gateway as its
traffic does.
Must not: create its own HTTP client (one is shared by all checkers), start tasks other
than through `proxy.aio.spawn`, or touch the flags other health sources own.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from multidict import CIMultiDict

from proxy.aio import cancel_and_wait, spawn, within
from proxy.clock import Clock
from proxy.config.model import Gateway, HealthCheck
from proxy.events import Emitter, Severity
from proxy.upstream.client import DEFAULT_MAX_CONNECTIONS, Response, UpstreamClient, UpstreamError
from proxy.upstream.state import Flag, GatewayState

logger = logging.getLogger(__name__)

#: Jitter added to each interval, as a fraction of it.
JITTER = 0.1

#: Cap on how many times `healthy_threshold` passes a flapping gateway must show.
MAX_PASS_FACTOR = 16

#: The interval, as a fraction of the configured one, while the gateway is failing.
FAILING_INTERVAL = 0.5

#: Bytes of a probe's answer body kept; a longer body is cut off (its connection closed).
PROBE_BODY = 64 * 1024

USER_AGENT = "payswitch-health"

Sleep = Callable[[float], Awaitable[None]]


def probe_url(gw: Gateway, hc: HealthCheck) -> str:
    host = f"[{gw.host}]" if ":" in gw.host else gw.host
    return f"{gw.scheme}://{host}:{gw.port}{gw.base_path}{hc.path}"


def _status_of(value: Response | UpstreamError) -> int | UpstreamError:
    if isinstance(value, Response):
        if value.streaming:
            value.release()  # a body longer than a probe needs: the connection is closed
        return value.status
    return value


async def probe_status(client: UpstreamClient, gw: Gateway, hc: HealthCheck) -> int:
    """One probe of `gw`: its status, TimeoutError after `hc.timeout`, or the
    UpstreamError that ended the exchange. Redirects are not followed."""
    tls = gw.tls
    if tls is None:
        pool = client.pool((gw.scheme, gw.host, gw.port))
    else:
        pool = client.pool((gw.scheme, gw.host, gw.port), tls.context, tls.server_name)
    headers = CIMultiDict({"User-Agent": USER_AGENT})
    data = client.encode(pool, hc.method, gw.base_path + hc.path, headers, b"")
    fut = client.send(
        pool,
        data,
        within=hc.timeout,
        connect_timeout=hc.timeout,
        convert=_status_of,
        head_only=hc.method == "HEAD",
        limit=PROBE_BODY,
        max_connections=gw.limits.max_connections or DEFAULT_MAX_CONNECTIONS,
    )
    # Cancelled on timeout, which closes the connection: a late answer is not read.
    result: int | UpstreamError = await within(fut, hc.timeout)
    if isinstance(result, UpstreamError):
        raise result
    return result


@dataclass(frozen=True, slots=True, kw_only=True)
class ActiveStatus:
    """A snapshot of one gateway's active-check state for the admin API."""

    failing: bool
    consecutive_successes: int
    consecutive_failures: int
    last_result: str | None
    last_checked_ago_s: float | None
    passes_needed: int


class ActiveChecker:
    """Probe loop and thresholds of one gateway; config read from `st.gateway` each time."""

    def __init__(
        self,
        st: GatewayState,
        *,
        clock: Clock,
        events: Emitter,
        on_restored: Callable[[GatewayState], None] | None = None,
        on_result: Callable[[GatewayState, bool], None] | None = None,
        sleep: Sleep = asyncio.sleep,
        rng: random.Random | None = None,
    ) -> None:
        self.st = st
        self._clock = clock
        self._events = events
        self._on_restored = on_restored
        self._on_result = on_result  # every verdict, for passive ejection to heed
        self._sleep = sleep
        self._rng = rng or random.Random()
        self._ok = 0
        self._failed = 0
        self._trips = 0  # times it went down without a calm period in between
        self._restored_at: float | None = None
        self._last_result: str | None = None
        self._last_checked: float | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def failing(self) -> bool:
        return bool(self.st.flags & Flag.ACTIVE_FAILED)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def record(self, ok: bool, detail: str) -> None:
        """Count one probe result and move the flag when a threshold is reached."""
        hc = self.st.gateway.health_check
        if hc is None:
            return
        self._last_result = detail
        self._last_checked = self._clock.now()
        if self._on_result is not None:
            self._on_result(self.st, ok)
        if ok:
            self._ok += 1
            self._failed = 0
            if self.failing and self._ok >= self.passes_needed(hc):
                reason = f"{self._ok} health checks passed"
                logger.info("%s restored by active checks", self.st.name)
                self._restored_at = self._last_checked
                self.st.clear_flag(Flag.ACTIVE_FAILED, reason)
                self._events.emit(
                    "gateway.restored",
                    Severity.INFO,
                    gateway=self.st.name,
                    source="active",
                    reason=reason,
                )
                if self._on_restored is not None:
                    self._on_restored(self.st)
            return
        self._failed += 1
        self._ok = 0
        if not self.failing and self._failed >= hc.unhealthy_threshold:
            reason = f"{self._failed} health checks failed, last: {detail}"
            self._trips = self._trips + 1 if self._flapping(hc) else 1
            if self._trips > 1:
                reason += (
                    f"; down again soon after returning, {self.passes_needed(hc)} passes to return"
                )
            logger.warning("%s failed active checks: %s", self.st.name, detail)
            self.st.set_flag(Flag.ACTIVE_FAILED, reason)
            # How long it stays out is not known: it returns after enough passing checks.
            self._events.emit(
                "gateway.ejected",
                Severity.CRITICAL,
                gateway=self.st.name,
                source="active",
                reason=reason,
                duration_s=None,
            )

    def passes_needed(self, hc: HealthCheck) -> int:
        """Passes in a row that bring the gateway back from its current failure."""
        factor = min(1 << max(self._trips - 1, 0), MAX_PASS_FACTOR)
        return hc.healthy_threshold * factor

    def _flapping(self, hc: HealthCheck) -> bool:
        """Whether it went down again before staying up as long as its next return would
        take: the calm period that forgives the failures before."""
        if self._restored_at is None or self._last_checked is None:
            return False
        calm = hc.healthy_threshold * min(1 << self._trips, MAX_PASS_FACTOR) * hc.interval
        return self._last_checked - self._restored_at < calm

    async def probe_once(self, client: UpstreamClient) -> bool:
        """Send one probe and record its result; True when it passed."""
        hc = self.st.gateway.health_check
        if hc is None:
            return False
        try:
            status = await probe_status(client, self.st.gateway, hc)
            ok = status in hc.expected_statuses
            detail = f"status {status}"
            if status == 429 and not ok:
                # A rate signal, not a verdict on health (DESIGN §4): counting it would take
                # a throttling gateway out as failed, and page someone, for being busy. The
                # limiter backs off on the 429s of real traffic.
                self._last_result = f"{detail}, no verdict"
                self._last_checked = self._clock.now()
                return False
        except TimeoutError:
            ok, detail = False, f"timeout after {hc.timeout:g}s"
        except (UpstreamError, OSError, ValueError) as exc:
            ok, detail = False, f"{type(exc).__name__}: {exc}"
        self.record(ok, detail)
        return ok

    def _pause(self, interval: float) -> float:
        return interval * (1.0 + JITTER * self._rng.random())

    async def run(self, client: UpstreamClient) -> None:
        """Probe until cancelled or until the gateway's health check is removed."""
        hc = self.st.gateway.health_check
        if hc is None:
            return
        # Start at a random point of the first interval so restarts do not align probes.
        await self._sleep(hc.interval * JITTER * self._rng.random())
        while (hc := self.st.gateway.health_check) is not None:
            try:
                await self.probe_once(client)
            except asyncio.CancelledError:
                raise
            except Exception:
                logger.exception("health check of %s crashed; counted as failed", self.st.name)
                self.record(False, "probe crashed")
            interval = hc.interval * (FAILING_INTERVAL if self.failing else 1.0)
            await self._sleep(self._pause(interval))

    def start(self, client: UpstreamClient) -> None:
        if self.running:
            return
        self._task = spawn(self.run(client), name=f"health-check:{self.st.name}")

    def cancel(self) -> asyncio.Task[None] | None:
        """Stop probing without waiting (for synchronous callers); returns the task."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
        return task

    async def stop(self) -> None:
        await cancel_and_wait(self.cancel())

    def status(self) -> ActiveStatus:
        hc = self.st.gateway.health_check
        ago = None if self._last_checked is None else self._clock.now() - self._last_checked
        return ActiveStatus(
            failing=self.failing,
            consecutive_successes=self._ok,
            consecutive_failures=self._failed,
            last_result=self._last_result,
            last_checked_ago_s=ago,
            passes_needed=0 if hc is None else self.passes_needed(hc),
        )
