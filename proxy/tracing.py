"""OpenTelemetry tracing for the request path, configured by the standard `OTEL_*` variables.

Owns: `Tracing`, built once by the composition root from the environment: the tracer
provider and its exporters, W3C trace-context extraction from clients and injection
upstream, and the span per request (SERVER) and per attempt (CLIENT).
Must not: register anything global (no global tracer provider, no global propagator), so
several instances can live side by side in tests, nor decide what an outcome means for
health; callers say whether an outcome is an error.

The `OTEL_*` variables are read by proxy.tracing_env.

Off costs nothing: with no exporter configured `enabled` is False, the request path checks
it once and skips all span work, and every method still answers with shared no-op objects
for callers that do not check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING, Any, Final

from proxy.aio import spawn
from proxy.config.model import Gateway
from proxy.spans import current_context

if TYPE_CHECKING:
    from opentelemetry import trace
    from opentelemetry.context import Context
    from opentelemetry.propagators.textmap import TextMapPropagator
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter
    from opentelemetry.sdk.trace.sampling import Sampler
    from opentelemetry.trace import Span
    from opentelemetry.util.types import AttributeValue

logger = logging.getLogger(__name__)

INSTRUMENTATION_NAME: Final = "payswitch"

#: Span work in progress: `request_span` and `attempt_span` answer a context manager
#: yielding a span.
SpanScope = AbstractContextManager["Span"]


def __getattr__(name: str) -> Any:
    # NOOP_SPAN is OpenTelemetry's invalid span, so it is built only when first asked for:
    # with tracing off the request path never asks (it skips span work on one test).
    if name == "NOOP_SPAN":
        return _noop_span()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_NOOP: list[SpanScope] = []


def _noop_span() -> SpanScope:
    """One shared, reusable context manager: a disabled tracer allocates nothing per
    request."""
    if not _NOOP:
        from opentelemetry import trace

        _NOOP.append(contextlib.nullcontext(trace.INVALID_SPAN))
    return _NOOP[0]


def exporter_names(env: Mapping[str, str]) -> list[str]:
    """OTEL_TRACES_EXPORTER's names; unset, otlp when an OTLP endpoint is set, else none."""
    names = env.get("OTEL_TRACES_EXPORTER")
    if names is None and (
        env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        names = "otlp"
    return split_names(names or "")


def split_names(value: str) -> list[str]:
    """The names of a comma-separated `OTEL_*` list, lower-cased, without `none`."""
    names = [n.strip().lower() for n in value.split(",")]
    return [n for n in names if n and n != "none"]


_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)


class Tracing:
    """Spans for requests and attempts; a no-op unless built with at least one processor."""

    __slots__ = ("_closing", "_fields", "_propagator", "_provider", "_tracer", "enabled")

    def __init__(
        self,
        processors: Sequence[SpanProcessor] = (),
        *,
        resource: Resource | None = None,
        sampler: Sampler | None = None,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.enabled: bool = bool(processors)
        self._propagator: TextMapPropagator | None = propagator
        self._fields: frozenset[str] = frozenset()
        self._closing: asyncio.Task[None] | None = None
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer | None = None
        if self.enabled:
            self._start(processors, resource, sampler)

    def _start(
        self,
        processors: Sequence[SpanProcessor],
        resource: Resource | None,
        sampler: Sampler | None,
    ) -> None:
        # OpenTelemetry is imported here, on, and never when tracing is off: its API and
        # SDK are ~50 modules a sidecar without a collector has no use for.
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.sampling import DEFAULT_ON
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        from proxy import tracing_env

        if self._propagator is None:
            self._propagator = TraceContextTextMapPropagator()
        self._fields = frozenset(f.lower() for f in self._propagator.fields)
        # Resource() rather than Resource.create(): the latter reads os.environ, and
        # this class must see only the environment it was given.
        self._provider = TracerProvider(
            sampler=sampler or DEFAULT_ON,
            resource=resource
            or Resource({**tracing_env.SDK_ATTRIBUTES, "service.name": tracing_env.SERVICE_NAME}),
            shutdown_on_exit=False,
        )
        for processor in processors:
            self._provider.add_span_processor(processor)
        self._tracer = self._provider.get_tracer(INSTRUMENTATION_NAME)

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Tracing:
        """Tracing as the `OTEL_*` variables in `env` ask for.

        OTEL_TRACES_EXPORTER names the exporters (otlp, console, none). Left unset, it is
        otlp when an OTLP endpoint is set (OTEL_EXPORTER_OTLP_ENDPOINT or
        OTEL_EXPORTER_OTLP_TRACES_ENDPOINT) and off otherwise, rather than the spec's
        otlp-to-localhost: a sidecar must not keep failing exports to a collector nobody
        deployed. Sampler, resource, propagators and batch settings follow the spec's
        variables.
        """
        if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
            return cls()
        names = exporter_names(env)
        if not names:
            return cls()  # off: nothing of OpenTelemetry is imported
        from proxy import tracing_env

        exporters: list[SpanExporter] = []
        for name in names:
            exporter = tracing_env.exporter(name, env)
            if exporter is not None:
                exporters.append(exporter)
        if not exporters:
            return cls()
        processors = [tracing_env.batch_processor(e, env) for e in exporters]
        tracing = cls(
            processors,
            resource=tracing_env.resource(env),
            sampler=tracing_env.sampler(env),
            propagator=tracing_env.propagator_from_env(env),
        )
        logger.info(
            "tracing on: exporters=%s",
            ",".join(type(e).__name__ for e in exporters),
        )
        return tracing

    # -- request path ----------------------------------------------------------------

    def request_span(
        self,
        method: str,
        route: str | None,
        headers: Mapping[str, str],
        *,
        path: str | None = None,
        region: str | None = None,
        transaction_id: str | None = None,
    ) -> AbstractContextManager[Span]:
        """The SERVER span of one client request, child of the client's trace context.

        `headers` should look keys up case-insensitively (the listener's request headers do).
        """
        if not self.enabled:
            return _noop_span()
        assert self._propagator is not None  # set whenever tracing is on
        parent = self._propagator.extract(headers)
        known = method if method in _KNOWN_METHODS else "_OTHER"
        attributes: dict[str, AttributeValue] = {"http.request.method": known, "url.scheme": "http"}
        if known != method:
            attributes["http.request.method_original"] = method
        if path is not None:
            attributes["url.path"] = path
        if route is not None:
            attributes["payswitch.route"] = route
        if region is not None:
            attributes["payswitch.region"] = region
        if transaction_id is not None:
            attributes["payswitch.transaction_id"] = transaction_id
        name = f"{known} {route}" if route is not None else known
        return self._server_span(name, parent, attributes)

    @contextlib.contextmanager
    def _server_span(
        self, name: str, parent: Context, attributes: Mapping[str, AttributeValue]
    ) -> Iterator[Span]:
        # The client's whole context is made current, not only used as the parent, so
        # what other propagators extracted (baggage) is injected upstream too.
        from opentelemetry import context as otel_context
        from opentelemetry.trace import SpanKind

        assert self._tracer is not None
        token = otel_context.attach(parent)
        try:
            with self._tracer.start_as_current_span(
                name, kind=SpanKind.SERVER, attributes=attributes
            ) as span:
                yield span
        finally:
            otel_context.detach(token)

    def attempt_span(
        self,
        gateway: Gateway,
        *,
        route: str,
        region: str,
        method: str,
        path_qs: str,
        attempt_id: str,
        attempt_no: int,
        transaction_id: str,
    ) -> AbstractContextManager[Span]:
        """The CLIENT span of one attempt at `gateway`, child of the current span, with
        the HTTP client semantic-convention attributes and payswitch's own."""
        if not self.enabled:
            return _noop_span()
        known = method if method in _KNOWN_METHODS else "_OTHER"
        attributes: dict[str, AttributeValue] = {
            "http.request.method": known,
            "server.address": gateway.host,
            "server.port": gateway.port,
            "url.full": gateway.url + path_qs,
            "payswitch.gateway": gateway.name,
            "payswitch.provider": gateway.provider,
            "payswitch.route": route,
            "payswitch.region": region,
            "payswitch.attempt_id": attempt_id,
            "payswitch.attempt_no": attempt_no,
            "payswitch.transaction_id": transaction_id,
        }
        if known != method:
            attributes["http.request.method_original"] = method
        if attempt_no > 1:
            attributes["http.request.resend_count"] = attempt_no - 1
        from opentelemetry.trace import SpanKind

        assert self._tracer is not None
        return self._tracer.start_as_current_span(
            f"attempt {gateway.name}", kind=SpanKind.CLIENT, attributes=attributes
        )

    @staticmethod
    def within_current(then: Callable[[], Awaitable[None]]) -> Callable[[], Awaitable[None]]:
        """`then`, run later under the trace context current now (the request's span), so
        what it emits carries the request's trace after its span has ended."""
        from opentelemetry import context as otel_context

        now = otel_context.get_current()

        async def run() -> None:
            token = otel_context.attach(now)
            try:
                await then()
            finally:
                otel_context.detach(token)

        return run

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Point the upstream request's trace headers at the current span.

        Any copy of the client's headers of the configured propagators is replaced,
        whatever its case, so the gateway never sees two parents.
        """
        if not self.enabled or current_context() is None or self._propagator is None:
            return
        for key in [k for k in headers if k.lower() in self._fields]:
            headers.pop(key, None)
        self._propagator.inject(headers)

    @staticmethod
    def record_outcome(
        span: Span, status: int | None, outcome: str, *, error: bool | None = None
    ) -> None:
        """Record how a request or attempt ended.

        `error` defaults to "no response, or a 5xx": a gateway's 4xx is its definitive
        answer (a decline), not a failure of the path. Pass it explicitly when the caller
        knows better (an attempt cancelled because another one won is not an error).
        """
        if not span.is_recording():
            return
        if status is not None:
            span.set_attribute("http.response.status_code", status)
        span.set_attribute("payswitch.outcome", outcome)
        failed = (status is None or status >= 500) if error is None else error
        if failed:
            span.set_attribute("error.type", outcome)
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, outcome))

    # -- lifecycle -------------------------------------------------------------------

    async def close(self) -> None:
        """Export what is queued and stop the exporters; later spans are no-ops."""
        if self._provider is None:
            return
        self.enabled = False
        if self._closing is None:
            # Shutdown blocks on export I/O; keep it off the event loop.
            self._closing = spawn(
                asyncio.to_thread(self._provider.shutdown), name="tracing-shutdown"
            )
        await asyncio.shield(self._closing)
