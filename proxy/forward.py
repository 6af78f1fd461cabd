"""One HTTP exchange with one gateway: the endpoint stage of the request path.

Owns: encoding the upstream request (proxy.headers decides which headers go), sending it
once through `UpstreamClient.send` (its one entry point), reading a small response
whole (so a gateway that dies mid-body is a failed attempt, not a truncated answer to the
client), and turning every client failure into a typed `AttemptFailed` that says whether the
request may have reached the gateway; payswitch's own shortages (descriptors, a gateway's
connection cap) are `Outcome.LOCAL`, never the gateway's failure.
Must not: retry, pick gateways or touch health; it makes exactly one attempt.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.model import IDEMPOTENT_METHODS, Gateway
from proxy.headers import HOP_BY_HOP, hop_by_hop, response_headers, upstream_headers
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

__all__ = [
    "BUFFER_LIMIT",
    "HOP_BY_HOP",
    "AttemptFailed",
    "Forwarder",
    "Reply",
    "hop_by_hop",
    "outcome_of",
    "response_headers",
    "upstream_headers",
]

#: Responses up to this size are read whole inside the attempt; larger ones are streamed.
BUFFER_LIMIT: Final = 1024 * 1024


class AttemptFailed(Exception):
    """An attempt ended without an HTTP response we can use."""

    def __init__(self, outcome: Outcome, detail: str, *, sent: bool) -> None:
        super().__init__(detail)
        self.outcome = outcome
        self.detail = detail
        self.sent = sent  # False only when the gateway provably received nothing


class Reply:
    """A gateway's HTTP answer: whole (`body`) or still streaming (`stream`).

    A plain class (built per answer): a dataclass's `__init__` runs interpreted."""

    __slots__ = ("body", "headers", "status", "stream")

    def __init__(
        self,
        status: int,
        headers: CIMultiDictProxy[str],
        body: bytes | None,  # the whole body, or what was read before switching to streaming
        stream: Response | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream

    def __repr__(self) -> str:
        return f"Reply({self.status}, {len(self.body or b'')} bytes, streaming={self.stream is not None})"

    def release(self) -> None:
        if self.stream is not None:
            self.stream.release()
            self.stream = None


def with_gateway_headers(headers: CIMultiDict[str], gw: Gateway) -> CIMultiDict[str]:
    """`headers` with the gateway's own (credentials) replacing any the client sent.

    A copy: the same request goes on to other gateways, which must not see these."""
    out = headers.copy()
    for header in gw.headers:
        out[header.name] = header.value.reveal()
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
        if gw.headers:
            headers = with_gateway_headers(headers, gw)
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
