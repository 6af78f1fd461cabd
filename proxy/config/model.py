"""The routing rules as immutable values.

Owns: the frozen dataclasses a loaded rules snapshot is made of, and their defaults.
Must not: parse files, hold runtime state (health, counters, buckets) or do I/O. Everything
here is built once by `proxy.config.load` and then only read.
"""

from __future__ import annotations

import hmac
import ssl
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Final, Literal

AfterAmbiguous = Literal["never", "same-provider", "any-gateway"]
Balancing = Literal["weighted-round-robin", "least-latency"]

#: Methods whose repetition has no extra effect (RFC 9110 §9.2.2). Everything else (POST,
#: PATCH, custom verbs) is treated as a payment that a resend could charge twice.
IDEMPOTENT_METHODS: Final = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})

#: Retry conditions besides plain status codes.
RETRY_CONDITIONS = ("connect-failure", "timeout", "reset")


#: The largest `max_body` a route may set: bodies are held in memory so a retry can
#: replay them, and payment requests are small.
MAX_BODY_LIMIT = 64 * 1024 * 1024


def _empty_map() -> Mapping[str, tuple[str, ...]]:
    return MappingProxyType({})


class Secret:
    """A value that must never be shown: its repr, str and JSON form are `<redacted>`.

    Only `reveal()` gives the value, where it is written into a request to a gateway.
    """

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "<redacted>"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self._value)

    def __reduce__(self) -> tuple[object, ...]:
        raise TypeError("a Secret is not to be pickled")


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayHeader:
    """A header payswitch adds to every request to one gateway, replacing the client's."""

    name: str
    value: Secret
    origin: str  # where the value was read: "file:/path", "env:NAME" or "rules"


@dataclass(frozen=True, slots=True, kw_only=True)
class Source:
    """Where a piece of the rules was written, for error messages and the admin API."""

    file: str
    line: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """Local saturation limits of one gateway; a gateway over one is skipped, not queued."""

    rate: float | None = None  # requests per second refilled into the bucket
    burst: int | None = None  # bucket size; defaults to max(1, rate) when only rate is set
    max_in_flight: int | None = None
    max_connections: int | None = None  # open to the gateway's origin; None: the client's default


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewayTLS:
    """How an https gateway is reached; `context` is built from the files when rules load."""

    ca_file: str | None = None  # None: the system's CAs
    server_name: str | None = None  # SNI and the name the certificate must carry; None: host
    client_cert: str | None = None  # mTLS
    client_key: str | None = None
    context: ssl.SSLContext = field(compare=False, repr=False)


@dataclass(frozen=True, slots=True, kw_only=True)
class HealthCheck:
    """Active HTTP probe of one gateway."""

    path: str = "/health"
    method: str = "GET"
    interval: float = 5.0
    timeout: float = 1.0
    healthy_threshold: int = 2
    unhealthy_threshold: int = 3
    expected_statuses: tuple[int, ...] = (200, 204)


@dataclass(frozen=True, slots=True, kw_only=True)
class OutlierDetection:
    """Passive ejection of a gateway from real traffic."""

    consecutive_failures: int = 5
    failure_percentage: float = 50.0  # of the requests in `window`
    window: float = 10.0
    min_requests: int = 10  # in the window before the percentage counts
    base_ejection: float = 5.0
    max_ejection: float = 300.0
    slow_start: float = 3.0  # ramp from 10% to full weight after a return


@dataclass(frozen=True, slots=True, kw_only=True)
class Degradation:
    """Predictive shedding: short-window EWMA against a long baseline."""

    enabled: bool = True
    short_window: float = 1.5  # EWMA time constants, seconds: short enough to shed a
    # gateway that slows towards the per-try timeout before it crosses it
    long_window: float = 120.0
    latency_ratio: float = 2.0  # short/long latency ratio at which the score reaches its floor
    error_rate: float = 0.25  # short-window error rate at which the score reaches its floor
    min_score: float = 0.05
    exploration: float = 0.02  # share of traffic kept on a degraded gateway to see recovery


@dataclass(frozen=True, slots=True, kw_only=True)
class Gateway:
    name: str
    url: str  # scheme://host:port[/base], no trailing slash
    scheme: str
    host: str
    port: int
    base_path: str  # "" or "/prefix" without trailing slash
    region: str
    weight: int = 1
    provider: str
    limits: Limits = field(default_factory=Limits)
    health_check: HealthCheck | None = None
    outlier: OutlierDetection = field(default_factory=OutlierDetection)
    degradation: Degradation = field(default_factory=Degradation)
    tls: GatewayTLS | None = None  # set for every https gateway
    headers: tuple[GatewayHeader, ...] = ()
    source: Source

    @property
    def identity(self) -> tuple[str, str]:
        """What runtime state is keyed by: a gateway keeps its state while this is unchanged."""
        return (self.name, self.url)


@dataclass(frozen=True, slots=True, kw_only=True)
class HeaderMatch:
    name: str  # lower-cased
    values: tuple[str, ...] | None  # None: present with any value


@dataclass(frozen=True, slots=True, kw_only=True)
class BodyMatch:
    path: tuple[str, ...]  # JSON object keys, outermost first
    values: tuple[str | int | float | bool, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class Match:
    path: str | None = None
    path_prefix: str | None = None
    methods: frozenset[str] | None = None
    headers: tuple[HeaderMatch, ...] = ()
    body: tuple[BodyMatch, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class RegionPolicy:
    header: str = "X-Region"
    default: str
    fallback: Mapping[str, tuple[str, ...]] = field(default_factory=_empty_map)
    country_header: str | None = None
    countries: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True, kw_only=True)
class Timeouts:
    per_try: float = 2.0
    total: float = 10.0
    connect: float = 1.0
    abandoned: float = 30.0  # how long an attempt abandoned on per-try timeout is kept open
    # Once no gateway may take an ambiguous payment, how long to wait for an abandoned
    # attempt's answer before telling the client "outcome unknown" (capped by `total`).
    unknown_after: float = 2.0


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    base: float = 0.005
    max: float = 0.05


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    attempts: int = 2
    on_connect_failure: bool = True
    on_timeout: bool = False
    on_reset: bool = False
    on_statuses: frozenset[int] = frozenset()
    not_processed: frozenset[int] = frozenset()  # statuses that prove nothing was done
    after_ambiguous: AfterAmbiguous = "never"
    backoff: Backoff = field(default_factory=Backoff)


@dataclass(frozen=True, slots=True, kw_only=True)
class Idempotency:
    header: str = "Idempotency-Key"
    required: bool = False
    ttl: float = 86400.0
    scope_header: str | None = None  # client identity the keys are scoped by
    on_store_down: Literal["refuse", "local"] = "refuse"


@dataclass(frozen=True, slots=True, kw_only=True)
class Route:
    name: str
    match: Match
    region: RegionPolicy
    gateways: tuple[str, ...]
    timeouts: Timeouts = field(default_factory=Timeouts)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    max_body: int = 1024 * 1024
    balancing: Balancing = "weighted-round-robin"
    max_ejected_percent: float = 50.0
    panic: bool = False  # send to ejected gateways when none is eligible
    idempotency: Idempotency | None = None
    source: Source


@dataclass(frozen=True, slots=True, kw_only=True)
class TransactionHeaders:
    transaction_id: str = "X-Payswitch-Transaction-Id"
    attempt_id: str = "X-Payswitch-Attempt-Id"


@dataclass(frozen=True, slots=True, kw_only=True)
class Rules:
    """One complete, validated set of rules: what a reload swaps in whole."""

    gateways: Mapping[str, Gateway]
    routes: tuple[Route, ...]
    transaction_headers: TransactionHeaders = field(default_factory=TransactionHeaders)
    files: tuple[str, ...] = ()
    content_hash: str = ""
    raw: Mapping[str, object] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def reads_secrets(self) -> bool:
        """Whether loading read header values from files or the environment: then the
        same rules files can load to different rules, and a reload must read them again."""
        return any(h.origin != "rules" for g in self.gateways.values() for h in g.headers)

    def secrets(self) -> tuple[tuple[str, str, Secret], ...]:
        return tuple((g.name, h.name, h.value) for g in self.gateways.values() for h in g.headers)
