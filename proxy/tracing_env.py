"""How the `OTEL_*` environment variables become tracing parts, as the SDK reads them.

Owns: turning an environment mapping into span exporters (otlp over HTTP/protobuf or
gRPC, console), batch processors, the resource, the sampler and the propagators, each
following the OpenTelemetry specification's variables, and warning once about a value it
cannot use.
Must not: read os.environ itself (callers pass the mapping, so tests and several
instances stay apart), nor register anything global.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import logging
from collections.abc import Callable, Mapping
from typing import Final, cast
from urllib.parse import unquote

from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.sdk.resources import Resource
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
from opentelemetry.util.re import parse_env_headers
from opentelemetry.util.types import AttributeValue

from proxy.tracing import exporter_names, split_names

__all__ = ["exporter_names"]

logger = logging.getLogger(__name__)

SERVICE_NAME: Final = "payswitch"

SDK_ATTRIBUTES: Final[Mapping[str, AttributeValue]] = {
    "telemetry.sdk.language": "python",
    "telemetry.sdk.name": "opentelemetry",
    "telemetry.sdk.version": _sdk_version,
}
_DEFAULT_PROPAGATORS: Final = "tracecontext,baggage"
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


def propagator_from_env(env: Mapping[str, str]) -> TextMapPropagator:
    """The propagators OTEL_PROPAGATORS names (default tracecontext,baggage), found the way
    the SDK finds them: by the `opentelemetry_propagator` entry point of that name."""
    found: list[TextMapPropagator] = []
    for name in split_names(env.get("OTEL_PROPAGATORS", _DEFAULT_PROPAGATORS)):
        points = importlib.metadata.entry_points(group="opentelemetry_propagator", name=name)
        point = next(iter(points), None)
        if point is None:
            logger.warning("OTEL_PROPAGATORS: %s is not installed; skipped", name)
            continue
        found.append(point.load()())
    return CompositePropagator(found)


def exporter(name: str, env: Mapping[str, str]) -> SpanExporter | None:
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


def resource(env: Mapping[str, str]) -> Resource:
    attributes: dict[str, AttributeValue] = {}
    for item in env.get("OTEL_RESOURCE_ATTRIBUTES", "").split(","):
        key, sep, value = item.partition("=")
        if sep and key.strip():
            attributes[key.strip()] = unquote(value.strip())
    # OTEL_SERVICE_NAME wins over service.name in OTEL_RESOURCE_ATTRIBUTES, per the spec.
    name = env.get("OTEL_SERVICE_NAME", "").strip()
    if name or "service.name" not in attributes:
        attributes["service.name"] = name or SERVICE_NAME
    return Resource({**SDK_ATTRIBUTES, **attributes})


def sampler(env: Mapping[str, str]) -> Sampler:
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


def batch_processor(exporter: SpanExporter, env: Mapping[str, str]) -> BatchSpanProcessor:
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
