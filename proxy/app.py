"""Composition root: builds every long-lived part once, wires them, serves, shuts down.

Owns: `Runtime` (the one place state objects are created and connected), the proxy and
admin applications, signal handling (SIGHUP reloads, SIGTERM drains) and the graceful
shutdown sequence.
Must not: contain request logic; that lives in handler, retry, forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from types import MappingProxyType
from typing import Any

from aiohttp import web
from prometheus_client import CollectorRegistry

from proxy.accesslog import AccessLog
from proxy.aio import cancel_and_wait, spawn
from proxy.attempt import Attempt
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.store import ConfigStore, Snapshot
from proxy.errors import Tried
from proxy.events import EventBus, Severity, Sink, StreamSink
from proxy.forward import AttemptFailed, Forwarder, Reply, new_session
from proxy.handler import ProxyHandler
from proxy.headers import HeaderPolicy, parse_networks
from proxy.idempotency import (
    IdempotencyStore,
    MemoryIdempotencyStore,
    MemoryTransactionStore,
    TransactionStore,
)
from proxy.idempotency.guard import StoreGuard
from proxy.kafka import plane as kafka_plane
from proxy.metrics import Metrics
from proxy.payments import Payments
from proxy.retry import Dispatch
from proxy.routing import Router, compile_router
from proxy.server import ProxyServer
from proxy.settings import Settings
from proxy.tracing import Tracing
from proxy.upstream.balancer import Balancer
from proxy.upstream.client import UpstreamClient
from proxy.upstream.health import Health
from proxy.upstream.state import StateRegistry

logger = logging.getLogger(__name__)

#: Seconds between two gateway.all_down events of one route while it stays down.
ALL_DOWN_REPEAT = 30.0


class Runtime:
    """Everything that lives as long as the process, built once and wired here."""

    def __init__(
        self,
        settings: Settings,
        *,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
        sinks: list[Sink] | None = None,
    ) -> None:
        self.settings = settings
        self.clock = clock
        self.registry = registry or CollectorRegistry()
        self.metrics = Metrics(self.registry)
        self.kafka = kafka_plane.build(settings.kafka, self.registry)
        self.events = EventBus(
            [*_sinks(settings), *kafka_plane.sinks(self.kafka), *(sinks or [])],
            clock=clock,
            registry=self.registry,
        )
        self.states = StateRegistry()
        self.health = Health(self.states, clock=clock, events=self.events, registry=self.registry)
        self.balancer = Balancer(self.states)
        self.store: ConfigStore[Router] = ConfigStore(
            settings.rules,
            compile_router,
            listeners=[self._on_swap],
            events=self.events,
            clock=clock,
            registry=self.registry,
        )
        self.tracing = Tracing.from_env(os.environ)
        if self.kafka is not None:
            self.kafka.attach(
                self.states, self.health, self.events, self._route_names, self.tracing.enabled
            )
        self.disabled_routes = self.kafka.disabled_routes if self.kafka else {}
        keys, log = _payment_stores(settings, clock)
        self.payments = Payments(
            keys,
            log,
            self.metrics,
            guard=StoreGuard(keys.ping, registry=self.registry, events=self.events),
            fallback=MemoryIdempotencyStore(
                clock=clock, max_bytes=settings.idempotency_memory_bytes
            ),
        )
        self.header_policy = HeaderPolicy(
            trusted_proxies=parse_networks(settings.trusted_proxies),
            drop_underscores=settings.underscore_headers == "drop",
        )
        self.access_log: AccessLog | None = AccessLog() if settings.access_log else None
        self.session: UpstreamClient | None = None
        self.forwarder: Forwarder
        self._all_down_at: dict[str, float] = {}
        self.shutting_down = False  # readiness fails; requests are still served
        self.stopping = asyncio.Event()
        self._tasks: list[asyncio.Task[Any]] = []

    # -- rules ----------------------------------------------------------------------------

    def _on_swap(self, new: Snapshot[Router], old: Snapshot[Router] | None) -> None:
        created, removed = self.states.reconcile(new.rules.gateways)
        new.compiled.states = MappingProxyType(
            {name: self.states[name] for name in new.rules.gateways}
        )
        self.health.reconcile(created, removed, routes=new.rules.routes)
        for new_route in new.rules.routes:
            # Present from the start, so an alert's increase() sees the first late result.
            for kind in ("duplicate_suspected", "duplicate_deduped", "late_success"):
                self.metrics.late_results.labels(new_route.name, kind)
        if old is not None:
            for route in {r.name for r in old.rules.routes} - {r.name for r in new.rules.routes}:
                self.balancer.forget(route)
        if self.kafka is not None:
            self.kafka.reapply()

    def _route_names(self) -> frozenset[str]:
        return frozenset(r.name for r in self.store.current.rules.routes)

    async def reload(self, trigger: str) -> None:
        await self.store.reload(trigger)

    # -- all gateways of a route down ------------------------------------------------------

    def all_down(
        self, route: str, region: str, _outcomes: list[str], tried: tuple[Tried, ...]
    ) -> None:
        """A request found no eligible gateway anywhere: page someone, once a period per
        route rather than once per refused request."""
        now = self.clock.now()
        if now - self._all_down_at.get(route, -ALL_DOWN_REPEAT) < ALL_DOWN_REPEAT:
            return
        self._all_down_at[route] = now
        reasons = {t.gateway: t.outcome.removeprefix("skipped:") for t in tried}
        logger.critical("route %s: no gateway available in any region (%s)", route, reasons)
        self.events.emit(
            "gateway.all_down", Severity.CRITICAL, route=route, region=region, reasons=reasons
        )

    # -- late answers of abandoned attempts ------------------------------------------------

    def settled(self, dispatch: Dispatch) -> None:
        """The client was answered: report attempts that may have charged it a second time.

        A sent attempt with no definitive answer, on a provider that cannot recognise it as
        the same payment as the winner, may have been charged too. Attempts still running
        are judged when they end (`late_result`).
        """
        winner = dispatch.winner
        if dispatch.idempotent or dispatch.client_outcome != "success" or winner is None:
            return
        for att in dispatch.attempts:
            if att is winner or att.did_nothing or not att.sent_unresolved:
                continue
            if att.task is not None and not att.task.done():
                continue
            if not dispatch.dedupes(att, winner):
                self._duplicate(dispatch, winner, att, None, "ambiguous")

    def late_result(self, dispatch: Dispatch, att: Attempt, result: Reply | AttemptFailed) -> None:
        """An attempt abandoned on its per-try timer ended after its request settled."""
        if dispatch.idempotent:
            return
        winner = dispatch.winner
        success = dispatch.client_outcome == "success" and winner is not None
        if isinstance(result, Reply):
            if result.status >= 300:
                return  # a definitive refusal: nothing was charged
            if success and winner is not None:
                reason = (
                    "both_succeeded_deduped" if dispatch.dedupes(att, winner) else "both_succeeded"
                )
                self._duplicate(dispatch, winner, att, result.status, reason)
            else:
                self._late_success(dispatch, att, result.status)
        elif success and winner is not None and not dispatch.dedupes(att, winner):
            self._duplicate(dispatch, winner, att, None, "unresolved")

    def _duplicate(
        self, dispatch: Dispatch, winner: Attempt, att: Attempt, status: int | None, reason: str
    ) -> None:
        route = dispatch.plan.name
        # Both answered, but the same provider saw the same key: it should have charged
        # once. Still reported, below the paging threshold, so reconciliation can check.
        deduped = reason == "both_succeeded_deduped"
        kind = "duplicate_deduped" if deduped else "duplicate_suspected"
        self.metrics.late_results.labels(route, kind).inc()
        self.payments.record_late(dispatch, kind, att, status)
        self.events.emit(
            "payment.duplicate_suspected",
            Severity.WARNING if deduped else Severity.CRITICAL,
            transaction_id=dispatch.transaction_id,
            route=route,
            reason=reason,
            attempts=[
                {
                    "attempt_id": winner.attempt_id,
                    "gateway": winner.gateway.name,
                    "status": _status_of(winner),
                },
                {"attempt_id": att.attempt_id, "gateway": att.gateway.name, "status": status},
            ],
        )

    def _late_success(self, dispatch: Dispatch, att: Attempt, status: int) -> None:
        route = dispatch.plan.name
        self.metrics.late_results.labels(route, "late_success").inc()
        self.payments.record_late(dispatch, "late_success", att, status)
        self.events.emit(
            "payment.late_success",
            Severity.CRITICAL,
            transaction_id=dispatch.transaction_id,
            route=route,
            attempt_id=att.attempt_id,
            gateway=att.gateway.name,
            status=status,
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.events.start()
        self.store.load_initial()
        self.session = new_session()
        self.forwarder = Forwarder(self.session)
        await self.health.start()
        if self.access_log is not None:
            await self.access_log.start()
        if self.settings.watch:
            self._tasks.append(spawn(self.store.run_watcher(self.stopping), name="rules-watcher"))
        if self.kafka is not None:
            await self.kafka.start()

    async def close(self) -> None:
        self.stopping.set()
        await cancel_and_wait(*self._tasks)
        if self.kafka is not None:
            await self.kafka.close()
        await self.health.close()
        if self.session is not None:
            await self.session.close()
        if self.access_log is not None:
            await self.access_log.close()
        await self.tracing.close()
        await self.payments.guard.close()
        await self.payments.keys.close()
        await self.payments.fallback.close()
        await self.payments.log.close()
        await self.events.close(2.0)


def _status_of(att: Attempt) -> int | None:
    task = att.task
    if task is None or not task.done() or task.cancelled():
        return None
    result = task.result()
    return result.status if isinstance(result, Reply) else None


def _payment_stores(settings: Settings, clock: Clock) -> tuple[IdempotencyStore, TransactionStore]:
    url = settings.idempotency_store
    if url == "memory":
        return (
            MemoryIdempotencyStore(
                clock=clock,
                max_bytes=settings.idempotency_memory_bytes,
                when_full="refuse" if settings.idempotency_when_full == "refuse" else "evict",
            ),
            MemoryTransactionStore(clock=clock, max_bytes=settings.transaction_log_bytes),
        )
    if url.startswith(("redis://", "rediss://", "unix://")):
        prefix = settings.idempotency_prefix
        from proxy.idempotency.redis_store import RedisIdempotencyStore
        from proxy.idempotency.transactions import RedisTransactionStore

        return RedisIdempotencyStore.from_url(url, prefix), RedisTransactionStore.from_url(
            url, prefix
        )
    raise ValueError(f"idempotency store must be 'memory' or a redis:// URL, not {url!r}")


def _sinks(settings: Settings) -> list[Sink]:
    sinks: list[Sink] = []
    min_sev = Severity[settings.events_min_severity.upper()]
    if settings.events == "stdout":
        sinks.append(StreamSink(min_severity=min_sev))
    elif settings.events != "off":
        sinks.append(StreamSink(settings.events, name="file", min_severity=min_sev))
    if settings.webhook_url:
        from proxy.notify import WebhookSink

        sinks.append(
            WebhookSink(
                settings.webhook_url,
                min_severity=Severity[settings.webhook_min_severity.upper()],
                body_format=settings.webhook_format,
            )
        )
    return sinks


def proxy_server(rt: Runtime) -> ProxyServer:
    """The traffic listener: every request goes to the proxy handler."""
    handler = ProxyHandler(rt)
    return ProxyServer(handler.handle, handler.body_cap)


#: Allocations between young-generation collections. CPython's 700 makes a proxy at a few
#: thousand requests a second collect hundreds of times a second; each request allocates
#: short-lived objects that reference counting frees anyway.
GC_YOUNG_THRESHOLD = 20_000


def _tune_gc() -> None:
    """Move everything built at start-up (modules, rules, runtime) out of the collector's
    sight, and collect the young generation less often: fewer, cheaper collections, and no
    full-heap pauses through objects that live as long as the process."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code."""
    from proxy.admin import build_admin_app

    rt = Runtime(settings)
    await rt.start()
    _tune_gc()
    loop = asyncio.get_running_loop()
    traffic = proxy_server(rt)
    admin_runner = web.AppRunner(build_admin_app(rt), access_log=None, handle_signals=False)
    await admin_runner.setup()
    await traffic.start(settings.listen[0], settings.listen[1], backlog=1024)
    await web.TCPSite(
        admin_runner, settings.admin[0], settings.admin[1], reuse_address=True
    ).start()
    logger.info("serving on %s:%d, admin on %s:%d", *settings.listen, *settings.admin)
    stop = asyncio.Event()

    def on_term() -> None:
        if not stop.is_set():
            logger.info("shutdown requested: readiness fails now, draining")
            rt.shutting_down = True
            stop.set()

    def on_hup() -> None:
        spawn(rt.reload("signal"), name="reload-on-sighup")

    with contextlib.suppress(NotImplementedError):
        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_term)
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()
    # Kubernetes keeps sending for a moment after readiness fails: keep serving that long.
    await asyncio.sleep(settings.shutdown_grace)
    await traffic.close(settings.shutdown_deadline)  # stops accepting, lets in-flight finish
    await admin_runner.cleanup()
    await rt.close()
    return 0


@contextlib.asynccontextmanager
async def running(settings: Settings, **kwargs: Any) -> AsyncIterator[Runtime]:
    """A started Runtime for tests and tools; closed on exit."""
    rt = Runtime(settings, **kwargs)
    await rt.start()
    try:
        yield rt
    finally:
        await rt.close()
