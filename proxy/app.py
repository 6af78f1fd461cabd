"""Composition root: builds every long-lived part once, wires them, serves, shuts down.

Owns: `Runtime` (the one place state objects are created and connected), the proxy and
admin applications, signal handling (SIGHUP reloads, SIGTERM drains) and the graceful
shutdown sequence.
Must not: contain request logic; that lives in handler, retry, forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator, Callable
from types import MappingProxyType
from typing import Any

from prometheus_client import CollectorRegistry

from proxy.accesslog import AccessLog
from proxy.aio import cancel_and_wait, spawn
from proxy.clock import SYSTEM_CLOCK, Clock
from proxy.config.model import Rules
from proxy.config.store import ConfigStore, ReloadResult, Snapshot
from proxy.errors import Tried
from proxy.events import EventBus, Severity, Sink, StreamSink
from proxy.forward import Forwarder, new_session
from proxy.handler import ProxyHandler, attempt_metric
from proxy.headers import HeaderPolicy, parse_networks
from proxy.idempotency import (
    IdempotencyStore,
    MemoryIdempotencyStore,
    MemoryTransactionStore,
    TransactionStore,
)
from proxy.idempotency.guard import StoreGuard
from proxy.idempotency.metered import MeteredIdempotencyStore
from proxy.kafka import plane as kafka_plane
from proxy.ledger import PaymentsLedger
from proxy.logs import WriterCollector
from proxy.metrics import Metrics, register_process_collectors
from proxy.outbound import Parts
from proxy.payments import Payments
from proxy.routing import Router, compile_router
from proxy.server import ConnectionCap, ProxyServer, raise_open_files_limit
from proxy.settings import Settings
from proxy.tail import TailSink
from proxy.tracing import Tracing
from proxy.upstream.balancer import Balancer
from proxy.upstream.client import UpstreamClient
from proxy.upstream.health import Health
from proxy.upstream.state import GatewayState, StateRegistry
from proxy.windows import Windows

logger = logging.getLogger(__name__)

#: Seconds the admin and probes listeners give their answers in progress at shutdown.
ADMIN_CLOSE_DEADLINE = 5.0

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
        register_process_collectors(self.registry)
        self.registry.register(WriterCollector())
        self.tail = TailSink()
        self.kafka = kafka_plane.build(settings.kafka, self.registry)
        self.events = EventBus(
            [*_sinks(settings), self.tail, *kafka_plane.sinks(self.kafka), *(sinks or [])],
            clock=clock,
            registry=self.registry,
        )
        self.states = StateRegistry(on_create=self._on_gateway)
        self.windows = Windows(self.metrics, self.states, clock=clock)
        self.health = Health(self.states, clock=clock, events=self.events, registry=self.registry)
        self.balancer = Balancer(self.states)
        self._reconciled: tuple[list[GatewayState], list[GatewayState]] = ([], [])
        self.store: ConfigStore[Router] = ConfigStore(
            settings.rules,
            compile_router,
            listeners=[self._on_swap],
            binders=[self._bind_states],
            events=self.events,
            clock=clock,
            registry=self.registry,
        )
        self._tracing = Tracing.from_env(os.environ)
        self.metrics.exemplars = self._tracing.enabled
        if self.kafka is not None:
            self.kafka.attach(
                self.states, self.health, self.events, self._route_names, self._tracing.enabled
            )
        self.disabled_routes = self.kafka.disabled_routes if self.kafka else {}
        stores = _payment_stores(settings, clock)
        keys = MeteredIdempotencyStore(stores[0], self.registry)
        self.payments = Payments(
            keys,
            stores[1],
            self.metrics,
            guard=StoreGuard(keys.ping, registry=self.registry, events=self.events),
            fallback=MemoryIdempotencyStore(
                clock=clock, max_bytes=settings.idempotency_memory_bytes
            ),
        )
        self.ledger = PaymentsLedger(self.metrics, self.events, self.payments)
        self.header_policy = HeaderPolicy(
            trusted_proxies=parse_networks(settings.trusted_proxies),
            drop_underscores=settings.underscore_headers == "drop",
        )
        self.access_log: AccessLog | None = (
            AccessLog(trace_ids=self.tracing.enabled) if settings.access_log else None
        )
        # What gathers per-request output into batches, flushed by the handler whenever no
        # request is in flight: the encode and hand-off then land between requests, not on
        # a timer in the middle of one. Under load the batches fill and linger as before.
        self.idle_flush: tuple[Callable[[], None], ...] = (
            *((self.access_log.flush,) if self.access_log is not None else ()),
            *(s.flush for s in self.events.sinks if isinstance(s, StreamSink)),
        )
        self.session: UpstreamClient | None = None
        self.forwarder: Forwarder
        self.parts: Parts  # what every dispatch shares; built once the forwarder exists
        self._all_down_at: dict[str, float] = {}
        self.shutting_down = False  # readiness fails; requests are still served
        self.connections = ConnectionCap(settings.max_connections, registry=self.registry)
        self.stopping = asyncio.Event()
        # Under a supervisor: the workers not serving (readiness fails while any is down).
        self.workers_down: Callable[[], list[int]] = list
        self._tasks: list[asyncio.Task[Any]] = []

    def _on_gateway(self, st: GatewayState) -> None:
        self.windows.attach(st)

    @property
    def tracing(self) -> Tracing:
        return self._tracing

    @tracing.setter
    def tracing(self, tracing: Tracing) -> None:
        """Swap the tracer (tests, tools); dispatches started afterwards use it."""
        self._tracing = tracing
        if hasattr(self, "parts"):
            self.parts = dataclasses.replace(
                self.parts, tracing=tracing if tracing.enabled else None
            )

    # -- rules ----------------------------------------------------------------------------

    def _bind_states(self, rules: Rules, router: Router) -> None:
        """Give the new router the states of its gateways before it is published; a router
        missing any would skip that gateway on every request, so it is refused instead."""
        created, removed = self.states.reconcile(rules.gateways)
        states = {name: self.states[name] for name in rules.gateways}
        missing = sorted(
            {g.name for plan in router.plans for g in plan.gateways if g.name not in states}
        )
        if missing:
            raise RuntimeError(f"no runtime state for gateway(s) {', '.join(missing)}")
        router.states = MappingProxyType(states)
        self._reconciled = (created, removed)

    def _on_swap(self, new: Snapshot[Router], old: Snapshot[Router] | None) -> None:
        created, removed = self._reconciled
        self._reconciled = ([], [])
        self.health.reconcile(created, removed, routes=new.rules.routes)
        for new_route in new.rules.routes:
            # Present from the start, so an alert's increase() sees the first late result.
            self.ledger.track_route(new_route.name)
        if old is not None:
            for route in {r.name for r in old.rules.routes} - {r.name for r in new.rules.routes}:
                self.balancer.forget(route)
        if self.kafka is not None:
            self.kafka.reapply()

    def _route_names(self) -> frozenset[str]:
        return frozenset(r.name for r in self.store.current.rules.routes)

    async def reload(self, trigger: str) -> ReloadResult:
        return await self.store.reload(trigger)

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

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> None:
        await self.events.start()
        self.store.load_initial()
        self.session = new_session()
        self.forwarder = Forwarder(self.session)
        self.parts = Parts(
            balancer=self.balancer,
            health=self.health,
            forwarder=self.forwarder,
            clock=self.clock,
            tracing=self.tracing if self.tracing.enabled else None,
            attempt_ended=attempt_metric(self.metrics),
            late_result=self.ledger.late_result,
        )
        await self.health.start()
        if self.access_log is not None:
            await self.access_log.start()
        if self.settings.watch:
            self._tasks.append(spawn(self.store.run_watcher(self.stopping), name="rules-watcher"))
        self._tasks.append(spawn(self.windows.run(), name="dashboard-windows"))
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
        # Sinks get a few seconds to send what is queued (Kafka's transaction records above
        # all); what they cannot send by then is dropped and counted, critical records spill.
        await self.events.close(EVENTS_FLUSH)


#: Seconds the event sinks get at shutdown to send what is still queued.
EVENTS_FLUSH = 5.0


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
    return ProxyServer(handler.handle, handler.body_cap, rt.connections)


#: Allocations between young-generation collections. CPython's 700 makes a proxy at a few
#: thousand requests a second collect hundreds of times a second; each request allocates
#: short-lived objects that reference counting frees anyway.
GC_YOUNG_THRESHOLD = 20_000


def tune_gc() -> None:
    """Move everything built at start-up (modules, rules, runtime) out of the collector's
    sight, and collect the young generation less often: fewer, cheaper collections, and no
    full-heap pauses through objects that live as long as the process."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


async def serve(settings: Settings, on_ready: Callable[[Runtime], None] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the process exit code. `on_ready(rt)` is called
    once every listener is up (a worker tells its supervisor)."""
    from proxy.admin import start_admin, start_probes

    raise_open_files_limit()  # before the connection cap is derived from it
    rt = Runtime(settings)
    await rt.start()
    tune_gc()
    loop = asyncio.get_running_loop()
    traffic = proxy_server(rt)
    await traffic.start(*settings.listen, backlog=1024, reuse_port=settings.workers > 1)
    admin = await start_admin(rt)
    probes = await start_probes(rt)
    logger.info("serving on %s:%d, admin on %s:%d", *settings.listen, *settings.admin)
    if on_ready is not None:
        on_ready(rt)
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
    # Kubernetes keeps sending for a moment after readiness fails: keep serving that long,
    # telling keep-alive clients to reconnect (to a replica that stays) as they are answered.
    traffic.drain()
    await asyncio.sleep(settings.shutdown_grace)
    await traffic.close(settings.shutdown_deadline)  # stops accepting, lets in-flight finish
    await admin.close(ADMIN_CLOSE_DEADLINE)  # event streams end within a second of the drain
    if probes is not None:
        await probes.close(ADMIN_CLOSE_DEADLINE)
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
