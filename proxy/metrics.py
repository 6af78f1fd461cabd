"""Prometheus metrics of the request path, on an injected registry.

Owns: request and attempt counts and latency histograms (with trace exemplars when tracing
is on), retries by reason and listener refusals by reason, kept as plain numbers per
label set and turned into Prometheus families only when scraped; the less frequent
counters (late results, idempotency decisions) as ordinary metrics; the process, platform
and build-info collectors; and `render`, the exposition with OpenMetrics negotiated from
the scraper's Accept header.
Must not: be a module-level global; every Runtime (and every test) builds its own.
"""

from __future__ import annotations

import platform
import time
from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Info,
    PlatformCollector,
    ProcessCollector,
)
from prometheus_client.core import CounterMetricFamily, Exemplar, HistogramMetricFamily
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.registry import Collector

from proxy import version
from proxy.spans import current_context

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BUCKETS = _BUCKETS
_LE = [repr(b) for b in _BUCKETS]
_LABELS = ("route", "gateway", "outcome")


class _Series:
    """Count, sum and per-bucket counts of one label set; bucket i counts values <= _BUCKETS[i].

    `exemplars[i]` is the latest sampled trace seen in bucket i, kept only when tracing
    is on (OpenMetrics shows it; the Prometheus text format leaves it out).
    """

    __slots__ = ("buckets", "count", "exemplars", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(_BUCKETS) + 1)
        self.exemplars: list[Exemplar | None] | None = None

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.buckets[bisect_left(_BUCKETS, seconds)] += 1

    def exemplar(self, seconds: float) -> None:
        """Link the bucket of `seconds` to the current span, if one is sampled."""
        ctx = current_context()
        if ctx is None or not ctx.trace_flags.sampled:
            return
        if self.exemplars is None:
            self.exemplars = [None] * (len(_BUCKETS) + 1)
        self.exemplars[bisect_left(_BUCKETS, seconds)] = Exemplar(
            {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")},
            seconds,
            time.time(),
        )


class _Timed:
    """A counter and a histogram over the same labels, as one family pair at scrape time."""

    def __init__(
        self, counter: str, counter_help: str, histogram: str, histogram_help: str
    ) -> None:
        self.names = (counter, counter_help, histogram, histogram_help)
        self.series: dict[tuple[str, str, str], _Series] = {}

    def observe(self, key: tuple[str, str, str], seconds: float, exemplar: bool) -> None:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series()
        # `_Series.observe`, written out: twice per request
        s.count += 1
        s.sum += seconds
        s.buckets[bisect_left(_BUCKETS, seconds)] += 1
        if exemplar:
            s.exemplar(seconds)

    def families(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        counter, counter_help, histogram, histogram_help = self.names
        c = CounterMetricFamily(counter, counter_help, labels=_LABELS)
        h = HistogramMetricFamily(histogram, histogram_help, labels=_LABELS)
        for key, s in list(self.series.items()):
            c.add_metric(list(key), float(s.count))
            running = 0
            cumulative: list[tuple[str, float] | tuple[str, float, Exemplar]] = []
            ex = s.exemplars
            for i, (le, n) in enumerate(zip((*_LE, "+Inf"), s.buckets, strict=True)):
                running += n
                latest = ex[i] if ex is not None else None
                if latest is not None:
                    cumulative.append((le, float(running), latest))
                else:
                    cumulative.append((le, float(running)))
            h.add_metric(list(key), cumulative, sum_value=s.sum)
        yield c
        yield h


class _Collector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def collect(self) -> Iterable[CounterMetricFamily | HistogramMetricFamily]:
        yield from self._m._requests.families()
        yield from self._m._attempts.families()
        retries = CounterMetricFamily(
            "payswitch_retries",
            "Attempts beyond the first of a request, by route and the reason of the previous failure.",
            labels=("route", "reason"),
        )
        for (route, reason), n in list(self._m._retries.items()):
            retries.add_metric([route, reason], float(n))
        yield retries


class Metrics:
    def __init__(self, registry: CollectorRegistry, *, exemplars: bool = False) -> None:
        self.registry = registry
        #: Link latency buckets to the current trace; on only when tracing is on, so the
        #: request path pays one branch when it is off.
        self.exemplars = exemplars
        self._requests = _Timed(
            "payswitch_requests",
            "Requests answered, by route, the gateway that answered and outcome (status class or error).",
            "payswitch_request_duration_seconds",
            "Time from request received to response headers sent.",
        )
        self._attempts = _Timed(
            "payswitch_attempts",
            "Attempts sent to gateways, by route, gateway and outcome.",
            "payswitch_attempt_duration_seconds",
            "Time of one attempt against one gateway.",
        )
        self._retries: dict[tuple[str, str], int] = {}
        registry.register(_Collector(self))
        self.late_results = Counter(
            "payswitch_payment_late_results",
            "Abandoned attempts that answered after their request was settled, by kind.",
            ("route", "kind"),
            registry=registry,
        )
        self.idempotency = Counter(
            "payswitch_idempotency",
            "Idempotency-key decisions: claimed, replayed, conflict, mismatch, unresolved_retry, missing, invalid.",
            ("route", "result"),
            registry=registry,
        )

    def request(self, route: str, gateway: str, outcome: str, seconds: float) -> None:
        self._requests.observe((route, gateway, outcome), seconds, self.exemplars)

    def attempt(self, route: str, gateway: str, outcome: str, seconds: float) -> None:
        self._attempts.observe((route, gateway, outcome), seconds, self.exemplars)

    def request_counts(self) -> Iterator[tuple[str, str, int, list[int]]]:
        """(route, outcome, count, per-bucket counts) of every request series, for the
        dashboard's windows; bucket i counts values <= BUCKETS[i], the last is +Inf."""
        for (route, _, outcome), s in list(self._requests.series.items()):
            yield route, outcome, s.count, s.buckets

    def retry(self, route: str, reason: str) -> None:
        key = (route, reason)
        self._retries[key] = self._retries.get(key, 0) + 1


def register_process_collectors(registry: CollectorRegistry) -> None:
    """`process_*` (CPU, memory, descriptors, start time), `python_info`, `python_gc_*` and
    `payswitch_build_info`, as every Prometheus-instrumented service exposes them."""
    ProcessCollector(registry=registry)
    PlatformCollector(registry=registry)
    GCCollector(registry=registry)
    build = Info("payswitch_build", "The running build of payswitch.", registry=registry)
    build.info(
        {
            "version": version.version(),
            "build": version.build(),
            "python_version": platform.python_version(),
        }
    )


def render(registry: CollectorRegistry, accept: str | None) -> tuple[bytes, str]:
    """The registry in the format the scraper asks for: OpenMetrics (with exemplars) when
    its Accept header allows it, else the Prometheus text format."""
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
