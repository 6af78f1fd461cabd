"""OpenTelemetry tracing for the request path, configured by the standard `OTEL_*` variables.

Owns: `Tracing`, built once by the composition root from the environment: the tracer
provider and its exporters, W3C trace-context extraction from clients and injection
upstream, and the span per request (SERVER) and per attempt (CLIENT).
Must not: register anything global (no global tracer provider, no global propagator), so
several instances can live side by side in tests, nor decide what an outcome means for
health; callers say whether an outcome is an error.

Off costs nothing: with no exporter configured `enabled` is False, the request path checks
it once and skips all span work, and every method still answers with shared no-op objects
for callers that do not check.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import importlib.metadata
import logging
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from contextlib import AbstractContextManager
from typing import Final, cast
from urllib.parse import unquote

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import SpanProcessor, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    DEFAULT_OFF,
    DEFAULT_ON,
    ParentBasedTraceIdRatio,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.sdk.version import __version__ as _sdk_version
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.util.re import parse_env_headers
from opentelemetry.util.types import AttributeValue

from proxy.aio import spawn
from proxy.config.model import Gateway

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = "payswitch"
INSTRUMENTATION_NAME: Final = "payswitch"

#: One shared, reusable context manager: a disabled tracer allocates nothing per request.
NOOP_SPAN: Final[AbstractContextManager[Span]] = contextlib.nullcontext(trace.INVALID_SPAN)

_SDK_ATTRIBUTES: Final[Mapping[str, AttributeValue]] = {
    "telemetry.sdk.language": "python",
    "telemetry.sdk.name": "opentelemetry",
    "telemetry.sdk.version": _sdk_version,
}
_DEFAULT_PROPAGATORS: Final = "tracecontext,baggage"
_KNOWN_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
_OTLP_MODULES: Final = {
    "http/protobuf": (
        "opentelemetry.exporter.otlp.proto.http.trace_exporter",
        "opentelemetry-exporter-otlp-proto-http",
    ),
    "grpc": (
        "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
        "opentelemetry-exporter-otlp-proto-grpc",
    ),
}
_SAMPLERS: Final[Mapping[str, Callable[[float], Sampler]]] = {
    "always_on": lambda _: ALWAYS_ON,
    "always_off": lambda _: ALWAYS_OFF,
    "traceidratio": TraceIdRatioBased,
    "parentbased_always_on": lambda _: DEFAULT_ON,
    "parentbased_always_off": lambda _: DEFAULT_OFF,
    "parentbased_traceidratio": ParentBasedTraceIdRatio,
}


class Tracing:
    """Spans for requests and attempts; a no-op unless built with at least one processor."""

    __slots__ = ("_closing", "_fields", "_propagator", "_provider", "_tracer", "enabled")

    def __init__(
        self,
        processors: Sequence[SpanProcessor] = (),
        *,
        resource: Resource | None = None,
        sampler: Sampler = DEFAULT_ON,
        propagator: TextMapPropagator | None = None,
    ) -> None:
        self.enabled: bool = bool(processors)
        self._propagator = propagator or TraceContextTextMapPropagator()
        self._fields = frozenset(f.lower() for f in self._propagator.fields)
        self._closing: asyncio.Task[None] | None = None
        self._provider: TracerProvider | None = None
        self._tracer: trace.Tracer = trace.NoOpTracer()
        if self.enabled:
            # Resource() rather than Resource.create(): the latter reads os.environ, and
            # this class must see only the environment it was given.
            self._provider = TracerProvider(
                sampler=sampler,
                resource=resource or Resource({**_SDK_ATTRIBUTES, "service.name": SERVICE_NAME}),
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
        exporter_names = env.get("OTEL_TRACES_EXPORTER")
        if exporter_names is None and (
            env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        ):
            exporter_names = "otlp"
        exporters: list[SpanExporter] = []
        for name in _names(exporter_names or ""):
            exporter = _exporter(name, env)
            if exporter is not None:
                exporters.append(exporter)
        if not exporters:
            return cls()
        processors = [_batch_processor(e, env) for e in exporters]
        tracing = cls(
            processors,
            resource=_resource(env),
            sampler=_sampler(env),
            propagator=propagator_from_env(env),
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

        `headers` should look keys up case-insensitively (aiohttp's request headers do).
        """
        if not self.enabled:
            return NOOP_SPAN
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
            return NOOP_SPAN
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
        return self._tracer.start_as_current_span(
            f"attempt {gateway.name}", kind=SpanKind.CLIENT, attributes=attributes
        )

    def inject(self, headers: MutableMapping[str, str]) -> None:
        """Point the upstream request's trace headers at the current span.

        Any copy of the client's headers of the configured propagators is replaced,
        whatever its case, so the gateway never sees two parents.
        """
        if not self.enabled or not trace.get_current_span().get_span_context().is_valid:
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


def propagator_from_env(env: Mapping[str, str]) -> TextMapPropagator:
    """The propagators OTEL_PROPAGATORS names (default tracecontext,baggage), found the way
    the SDK finds them: by the `opentelemetry_propagator` entry point of that name."""
    found: list[TextMapPropagator] = []
    for name in _names(env.get("OTEL_PROPAGATORS", _DEFAULT_PROPAGATORS)):
        points = importlib.metadata.entry_points(group="opentelemetry_propagator", name=name)
        point = next(iter(points), None)
        if point is None:
            logger.warning("OTEL_PROPAGATORS: %s is not installed; skipped", name)
            continue
        found.append(point.load()())
    return CompositePropagator(found)


def _names(value: str) -> list[str]:
    names = [n.strip().lower() for n in value.split(",")]
    return [n for n in names if n and n != "none"]


def _exporter(name: str, env: Mapping[str, str]) -> SpanExporter | None:
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        return _otlp_exporter(env)
    logger.warning("OTEL_TRACES_EXPORTER=%s is not supported (otlp, console, none)", name)
    return None


def _otlp_exporter(env: Mapping[str, str]) -> SpanExporter | None:
    protocol = (
        env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
        or env.get("OTEL_EXPORTER_OTLP_PROTOCOL")
        or "http/protobuf"
    ).strip()
    if protocol not in _OTLP_MODULES:
        logger.warning("OTLP protocol %r is not supported; traces are not exported", protocol)
        return None
    module_name, package = _OTLP_MODULES[protocol]
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        logger.warning(
            "OTEL_TRACES_EXPORTER=otlp but %s is not installed; traces are not exported "
            "(pip install %s, or set OTEL_TRACES_EXPORTER=console to see them)",
            package,
            package,
        )
        return None
    kwargs: dict[str, object] = {}
    endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    base = env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if not endpoint and base:
        # The generic endpoint is a base URL; over HTTP the signal path is appended.
        endpoint = base.rstrip("/") + "/v1/traces" if protocol == "http/protobuf" else base
    if endpoint:
        kwargs["endpoint"] = endpoint
    headers = env.get("OTEL_EXPORTER_OTLP_TRACES_HEADERS") or env.get("OTEL_EXPORTER_OTLP_HEADERS")
    if headers:
        kwargs["headers"] = dict(parse_env_headers(headers, liberal=True))
    try:
        return cast(SpanExporter, module.OTLPSpanExporter(**kwargs))
    except Exception:
        logger.warning(
            "OTLP span exporter could not be built; traces are not exported", exc_info=True
        )
        return None


def _resource(env: Mapping[str, str]) -> Resource:
    attributes: dict[str, AttributeValue] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    # OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES, per the spec.
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name or "service.name" not in attributes:
        attributes["service.name"] = name or SERVICE_NAME
    return Resource({**_SDK_ATTRIBUTES, **attributes})


def _sampler(env: Mapping[str, str]) -> Sampler:
    name = env.get("OTEL_TRACES_SAMPLER", "parentbased_always_on").strip().lower()
    factory = _SAMPLERS.get(name)
    if factory is None:
        logger.warning("OTEL_TRACES_SAMPLER=%s is not known; sampling every trace", name)
        return DEFAULT_ON
    ratio = 1.0
    arg = env.get("OTEL_TRACES_SAMPLER_ARG")
    if arg is not None and name.endswith("traceidratio"):
        try:
            ratio = float(arg)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            logger.warning("OTEL_TRACES_SAMPLER_ARG=%s is not in [0, 1]; using 1.0", arg)
            ratio = 1.0
    return factory(ratio)


def _batch_processor(exporter: SpanExporter, env: Mapping[str, str]) -> BatchSpanProcessor:
    # Passed explicitly: left as None, the processor would read os.environ instead of `env`.
    return BatchSpanProcessor(
        exporter,
        max_queue_size=_positive_int(env, "OTEL_BSP_MAX_QUEUE_SIZE"),
        schedule_delay_millis=_positive_int(env, "OTEL_BSP_SCHEDULE_DELAY"),
        max_export_batch_size=_positive_int(env, "OTEL_BSP_MAX_EXPORT_BATCH_SIZE"),
        export_timeout_millis=_positive_int(env, "OTEL_BSP_EXPORT_TIMEOUT"),
    )


def _positive_int(env: Mapping[str, str], var: str) -> int | None:
    raw = env.get(var)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        logger.warning("%s=%s is not a positive integer; using the default", var, raw)
        return None
    return value
