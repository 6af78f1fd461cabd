"""Prometheus metrics of the request path, on an injected registry.

Owns: request and attempt counts and latency histograms, and retries by reason, kept as
plain numbers per label set and turned into Prometheus families only when scraped; the
less frequent counters (late results, idempotency decisions) as ordinary metrics.
Must not: be a module-level global; every Runtime (and every test) builds its own.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable, Iterator

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_LE = [repr(b) for b in _BUCKETS]
_LABELS = ("route", "gateway", "outcome")


class _Series:
    """Count, sum and per-bucket counts of one label set; bucket i counts values <= _BUCKETS[i]."""

    __slots__ = ("buckets", "count", "sum")

    def __init__(self) -> None:
        self.count = 0
        self.sum = 0.0
        self.buckets = [0] * (len(_BUCKETS) + 1)

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.sum += seconds
        self.buckets[bisect_left(_BUCKETS, seconds)] += 1


class _Timed:
    """A counter and a histogram over the same labels, as one family pair at scrape time."""

    def __init__(
        self, counter: str, counter_help: str, histogram: str, histogram_help: str
    ) -> None:
        self.names = (counter, counter_help, histogram, histogram_help)
        self.series: dict[tuple[str, str, str], _Series] = {}

    def observe(self, key: tuple[str, str, str], seconds: float) -> None:
        s = self.series.get(key)
        if s is None:
            s = self.series[key] = _Series()
        s.observe(seconds)

    def families(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        counter, counter_help, histogram, histogram_help = self.names
        c = CounterMetricFamily(counter, counter_help, labels=_LABELS)
        h = HistogramMetricFamily(histogram, histogram_help, labels=_LABELS)
        for key, s in list(self.series.items()):
            c.add_metric(list(key), float(s.count))
            running = 0
            cumulative = []
            for le, n in zip(_LE, s.buckets, strict=False):
                running += n
                cumulative.append((le, float(running)))
            cumulative.append(("+Inf", float(s.count)))
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
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
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
        self._requests.observe((route, gateway, outcome), seconds)

    def attempt(self, route: str, gateway: str, outcome: str, seconds: float) -> None:
        self._attempts.observe((route, gateway, outcome), seconds)

    def retry(self, route: str, reason: str) -> None:
        key = (route, reason)
        self._retries[key] = self._retries.get(key, 0) + 1
