"""Which client connections the listener takes on, and what it refuses, counted.

Owns: the cap on open client connections (below the open-files limit, so payswitch never
runs out of descriptors for its gateways), raising the soft open-files limit to the hard
one at start, the refusals metric by reason, a rate-limited log of refusals, and whether
the listener is overloaded (for readiness).
Must not: read or write sockets; the listener asks `admit` and reports what it refused.
"""

from __future__ import annotations

import logging
import resource
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge

logger = logging.getLogger(__name__)

#: The cap when none is configured, and the share of the open-files limit it stays under:
#: the rest is for gateway connections, the admin listener, logs and the rules.
DEFAULT_MAX_CONNECTIONS = 4096
NOFILE_SHARE = 0.8
#: Readiness reports overload for this long after the last connection refused.
OVERLOAD_HOLD = 5.0
#: At most one log line about refusals this often.
LOG_EVERY = 10.0
#: What `raise_open_files_limit` asks for when the hard limit is unlimited.
_UNLIMITED_NOFILE = 1 << 20


def raise_open_files_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit (as Envoy and nginx advise); returns
    (soft before, soft now) and logs both."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = _UNLIMITED_NOFILE if hard == resource.RLIM_INFINITY else hard
    now = soft
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            now = wanted
        except (ValueError, OSError) as exc:
            logger.warning(
                "could not raise the open-files limit from %d to %d: %s", soft, wanted, exc
            )
    logger.info("open-files limit: soft %d (was %d), hard %d", now, soft, hard)
    return soft, now


def default_max_connections(nofile: int | None = None) -> int:
    """min(4096, 80% of the soft open-files limit)."""
    if nofile is None:
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if nofile == resource.RLIM_INFINITY:
        return DEFAULT_MAX_CONNECTIONS
    return max(1, min(DEFAULT_MAX_CONNECTIONS, int(nofile * NOFILE_SHARE)))


class ConnectionCap:
    """Open client connections against the cap, and refusals by reason."""

    def __init__(
        self,
        limit: int | None = None,
        *,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        nofile_cap = default_max_connections()
        if limit is None:
            limit = nofile_cap
        elif limit < 1:
            raise ValueError(f"max_connections must be at least 1, got {limit}")
        elif limit > nofile_cap:
            logger.warning(
                "max_connections %d is above %d%% of the open-files limit (%d): the process "
                "may run out of descriptors before it refuses connections",
                limit,
                int(NOFILE_SHARE * 100),
                nofile_cap,
            )
        self.limit = limit
        self.open = 0
        self.clock = clock
        self._last_refusal = float("-inf")
        self._logged_at = float("-inf")
        self._unlogged = 0
        self._refusals = Counter(
            "payswitch_listener_refusals",
            "Client connections and requests the listener refused before any route, by reason",
            ["reason"],
            registry=registry,
        )
        gauge = Gauge(
            "payswitch_listener_connections",
            "Client connections open on the traffic listener",
            registry=registry,
        )
        gauge.set_function(lambda: self.open)
        Gauge(
            "payswitch_listener_max_connections",
            "The cap on client connections",
            registry=registry,
        ).set(limit)

    def admit(self) -> bool:
        """Take one more connection, or refuse it (and count it) at the cap."""
        if self.open < self.limit:
            self.open += 1
            return True
        self.refused("max_connections")
        return False

    def release(self) -> None:
        self.open -= 1

    def refused(self, reason: str) -> None:
        """Count a refusal; connection refusals are logged, at most once per LOG_EVERY."""
        self._refusals.labels(reason).inc()
        if reason != "max_connections":
            return
        now = self.clock()
        self._last_refusal = now
        self._unlogged += 1
        if now - self._logged_at >= LOG_EVERY:
            logger.warning(
                "refused %d client connection(s): %d open, cap %d (max_connections)",
                self._unlogged,
                self.open,
                self.limit,
            )
            self._logged_at = now
            self._unlogged = 0

    @property
    def overloaded(self) -> bool:
        """At the cap, or a connection refused a moment ago."""
        return self.open >= self.limit or self.clock() - self._last_refusal < OVERLOAD_HOLD
