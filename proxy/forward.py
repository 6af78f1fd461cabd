"""One HTTP exchange with one gateway: the endpoint stage of the request path.

Owns: building the upstream request (hop-by-hop headers removed, X-Forwarded-* added),
sending it once through `UpstreamClient.send` (its one entry point), reading a small response
whole (so a gateway that dies mid-body is a failed attempt, not a truncated answer to the
client), and turning every client failure into a typed `AttemptFailed` that says whether the
request may have reached the gateway; payswitch's own shortages (descriptors, a gateway's
connection cap) are `Outcome.LOCAL`, never the gateway's failure.
Must not: retry, pick gateways or touch health; it makes exactly one attempt.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.model import IDEMPOTENT_METHODS, Gateway
from proxy.upstream.client import (
    DEFAULT_MAX_CONNECTIONS,
    BadResponse,
    ConnectFailed,
    Expired,
    LocalFailure,
    Response,
    UpstreamClient,
    UpstreamError,
)
from proxy.upstream.phase import Progress
from proxy.upstream.state import Outcome

logger = logging.getLogger(__name__)

#: RFC 9110 §7.6.1 connection-specific fields, plus the de-facto ones proxies drop.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "proxy-connection",
        "keep-alive",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "proxy-authenticate",
        "proxy-authorization",
    }
)

#: Responses up to this size are read whole inside the attempt; larger ones are streamed.
BUFFER_LIMIT = 1024 * 1024


class AttemptFailed(Exception):
    """An attempt ended without an HTTP response we can use."""

    def __init__(self, outcome: Outcome, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.sent = sent  # False only when the gateway provably received nothing


@dataclass(slots=True)
class Reply:
    """A gateway's HTTP answer: whole (`body`) or still streaming (`stream`)."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes | None  # the whole body, or what was read before switching to streaming
    stream: Response | None = None

    def release(self) -> None:
        if self.stream is not None:
            self.stream.release()
            self.stream = None


_CONNECTION_DROPS: dict[str, frozenset[str]] = {}


def hop_by_hop(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    """The fields not to pass on: RFC 9110's hop-by-hop list plus any named in Connection."""
    conn = headers.get("Connection")
    if not conn:
        return HOP_BY_HOP
    drop = _CONNECTION_DROPS.get(conn)
    if drop is None:
        named = {t.strip().lower() for t in conn.split(",") if t.strip()}
        drop = HOP_BY_HOP | named
        if len(_CONNECTION_DROPS) < 256:  # a handful of values in practice; bounded anyway
            _CONNECTION_DROPS[conn] = drop
    return drop


def upstream_headers(
    headers: CIMultiDictProxy[str], *, client_ip: str | None, scheme: str, host: str | None
) -> CIMultiDict[str]:
    """The client's headers as the gateway should see them."""
    drop = hop_by_hop(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk == "host" or lk == "content-length":
            continue
        out.add(k, v)
    if client_ip:
        prior = headers.get("X-Forwarded-For")
        out["X-Forwarded-For"] = f"{prior}, {client_ip}" if prior else client_ip
    if "X-Forwarded-Proto" not in out:
        out["X-Forwarded-Proto"] = scheme
    if host and "X-Forwarded-Host" not in out:
        out["X-Forwarded-Host"] = host
    return out


def response_headers(headers: CIMultiDictProxy[str]) -> CIMultiDict[str]:
    """The gateway's response headers as the client should see them (framing is ours)."""
    drop = hop_by_hop(headers)
    out: CIMultiDict[str] = CIMultiDict()
    for k, v in headers.items():
        lk = k.lower()
        if lk in drop or lk == "content-length":
            continue
        out.add(k, v)
    return out


def new_session(*, idle_timeout: float = 15.0, max_idle: int = 256) -> UpstreamClient:
    """The one pooled keep-alive upstream client every attempt shares."""
    return UpstreamClient(idle_timeout=idle_timeout, max_idle=max_idle)


class Forwarder:
    __slots__ = ("_client",)

    def __init__(self, client: UpstreamClient) -> None:
        self._client = client

    def start(
        self,
        gw: Gateway,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        connect_timeout: float,
        within: float,
        progress: Progress | None = None,
    ) -> asyncio.Future[Reply | AttemptFailed]:
        """Send once; the future resolves to the reply or the typed failure (see
        `outcome_of`) and never raises. `progress` follows the exchange. On a pooled
        connection no task is made. Cancelling the future closes the connection. `within`
        bounds the exchange from its first byte written."""
        client = self._client
        tls = gw.tls
        if tls is None:
            pool = client.pool((gw.scheme, gw.host, gw.port))
        else:
            pool = client.pool((gw.scheme, gw.host, gw.port), tls.context, tls.server_name)
        try:
            data = client.encode(pool, method, gw.base_path + path_qs, headers, body)
        except ValueError as exc:
            done: asyncio.Future[Reply | AttemptFailed] = asyncio.get_running_loop().create_future()
            done.set_result(
                AttemptFailed(Outcome.BAD_RESPONSE, f"bad request head: {exc}", sent=False)
            )
            return done
        return client.send(
            pool,
            data,
            within=within,
            connect_timeout=connect_timeout,
            convert=outcome_of,
            head_only=method == "HEAD",
            idempotent=method in IDEMPOTENT_METHODS,
            limit=BUFFER_LIMIT,
            max_connections=gw.limits.max_connections or DEFAULT_MAX_CONNECTIONS,
            progress=progress,
        )


def outcome_of(value: Response | UpstreamError) -> Reply | AttemptFailed:
    """What an exchange's end means for the request: a reply, or a typed failure saying
    whether the gateway may have seen the request."""
    if isinstance(value, Response):
        if value.streaming:
            return Reply(value.status, value.headers, value.body, value)
        return Reply(value.status, value.headers, value.body)
    if isinstance(value, ConnectFailed):
        return AttemptFailed(Outcome.CONNECT_FAILURE, str(value), sent=False)
    if isinstance(value, LocalFailure):
        return AttemptFailed(Outcome.LOCAL, str(value), sent=False)
    if isinstance(value, Expired):
        return AttemptFailed(Outcome.TIMEOUT, str(value), sent=True)
    if isinstance(value, BadResponse):
        return AttemptFailed(Outcome.BAD_RESPONSE, str(value), sent=True)
    # ConnectionLost after the write, even on a reused connection before any response byte:
    # the gateway may have read the request, so this is never "provably unsent" (a close
    # seen before the write never gets here: the client does not use that connection).
    return AttemptFailed(Outcome.RESET, str(value), sent=True)
