"""Prometheus metrics of the request path, on an injected registry.

Owns: the request/attempt counters and latency histograms, with label children cached so
the hot path does one dict lookup per observation.
Must not: be a module-level global; every Runtime (and every test) builds its own.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def status_class(status: int) -> str:
    return f"{status // 100}xx"


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.requests = Counter(
            "payswitch_requests",
            "Requests answered, by route, the gateway that answered and outcome (status class or error).",
            ("route", "gateway", "outcome"),
            registry=registry,
        )
        self.request_latency = Histogram(
            "payswitch_request_duration_seconds",
            "Time from request received to response headers sent.",
            ("route", "gateway", "outcome"),
            buckets=_BUCKETS,
            registry=registry,
        )
        self.attempts = Counter(
            "payswitch_attempts",
            "Attempts sent to gateways, by route, gateway and outcome.",
            ("route", "gateway", "outcome"),
            registry=registry,
        )
        self.attempt_latency = Histogram(
            "payswitch_attempt_duration_seconds",
            "Time of one attempt against one gateway.",
            ("route", "gateway", "outcome"),
            buckets=_BUCKETS,
            registry=registry,
        )
        self.retries = Counter(
            "payswitch_retries",
            "Attempts beyond the first of a request, by route and the reason of the previous failure.",
            ("route", "reason"),
            registry=registry,
        )
        self.in_flight = Gauge(
            "payswitch_requests_in_flight", "Requests being handled.", registry=registry
        )
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
        self._req: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}
        self._att: dict[tuple[str, str, str], tuple[Counter, Histogram]] = {}

    def request(self, route: str, gateway: str, outcome: str, seconds: float) -> None:
        key = (route, gateway, outcome)
        pair = self._req.get(key)
        if pair is None:
            pair = self._req[key] = (self.requests.labels(*key), self.request_latency.labels(*key))
        pair[0].inc()
        pair[1].observe(seconds)

    def attempt(self, route: str, gateway: str, outcome: str, seconds: float) -> None:
        key = (route, gateway, outcome)
        pair = self._att.get(key)
        if pair is None:
            pair = self._att[key] = (self.attempts.labels(*key), self.attempt_latency.labels(*key))
        pair[0].inc()
        pair[1].observe(seconds)
