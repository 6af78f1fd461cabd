"""One HTTP exchange with one gateway: the endpoint stage of the request path.

Owns: encoding the upstream request (proxy.headers decides which headers go), sending it once on the pooled upstream client, reading a small response whole (so a gateway
that dies mid-body is a failed attempt, not a truncated answer to the client), and turning
every client failure into a typed `AttemptFailed` that says whether the request may have
reached the gateway.
Must not: retry, pick gateways or touch health; it makes exactly one attempt.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.model import Gateway
from proxy.headers import HOP_BY_HOP, hop_by_hop, response_headers, upstream_headers
from proxy.upstream.client import (
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    Expired,
    Response,
    UpstreamClient,
    UpstreamError,
)
from proxy.upstream.phase import Phase, Progress
from proxy.upstream.state import Outcome

logger = logging.getLogger(__name__)

__all__ = [
    "BUFFER_LIMIT",
    "HOP_BY_HOP",
    "AttemptFailed",
    "Forwarder",
    "Reply",
    "hop_by_hop",
    "response_headers",
    "upstream_headers",
]

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
        `outcome_of`). On a pooled connection no task is made: the exchange is driven by the
        connection's own callbacks. Cancelling the future closes the connection. `within`
        bounds the exchange from its first byte written."""
        client = self._client
        origin = (gw.scheme, gw.host, gw.port)
        head_only = method == "HEAD"
        try:
            data = client.encode(origin, method, gw.base_path + path_qs, headers, body)
        except ValueError as exc:
            done: asyncio.Future[Reply | AttemptFailed] = asyncio.get_running_loop().create_future()
            done.set_result(
                AttemptFailed(Outcome.BAD_RESPONSE, f"bad request head: {exc}", sent=False)
            )
            return done
        conn = client.idle(origin)
        if conn is not None:
            if progress is not None:
                progress.advance(Phase.SENT)
            return client.begin(
                conn,
                data,
                head_only=head_only,
                limit=BUFFER_LIMIT,
                within=within,
                convert=outcome_of,
            )
        return asyncio.get_running_loop().create_task(
            self._connect_then(origin, data, head_only, connect_timeout, within, progress),
            name=f"connect:{gw.name}",
        )

    async def _connect_then(
        self,
        origin: tuple[str, str, int],
        data: bytes,
        head_only: bool,
        connect_timeout: float,
        within: float,
        progress: Progress | None,
    ) -> Reply | AttemptFailed:
        try:
            conn = await self._client.connect(origin, connect_timeout)
        except ConnectFailed as exc:
            return outcome_of(exc)
        if progress is not None:
            # Written in one call on a fresh connection: treated as handed over at once.
            progress.advance(Phase.SENT)
        fut = self._client.begin(
            conn, data, head_only=head_only, limit=BUFFER_LIMIT, within=within, convert=outcome_of
        )
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()
            raise

    async def attempt(
        self,
        gw: Gateway,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        connect_timeout: float,
    ) -> Reply:
        """Send once and return the reply; the caller bounds the whole call in time.

        Raises AttemptFailed. Cancellation (the caller's per-try timer) propagates as is and
        closes the connection: the caller knows whether the request was already on its way.
        """
        try:
            resp = await self._client.request(
                (gw.scheme, gw.host, gw.port),
                method,
                gw.base_path + path_qs,
                headers,
                body,
                connect_timeout=connect_timeout,
            )
        except ConnectFailed as exc:
            raise AttemptFailed(Outcome.CONNECT_FAILURE, str(exc), sent=False) from None
        except ConnectionLost as exc:
            # Also on a reused connection before any response byte: the gateway may have
            # read the request, so this is never "provably unsent".
            raise AttemptFailed(Outcome.RESET, str(exc), sent=True) from None
        except BadResponse as exc:
            raise AttemptFailed(Outcome.BAD_RESPONSE, str(exc), sent=True) from None
        except ValueError as exc:  # a header that would split the request; nothing was sent
            raise AttemptFailed(
                Outcome.BAD_RESPONSE, f"bad request head: {exc}", sent=False
            ) from None
        length = resp.content_length
        if length is not None and length > BUFFER_LIMIT:
            return Reply(resp.status, resp.headers, None, resp)
        try:
            data = await resp.read_up_to(BUFFER_LIMIT)
        except BaseException as exc:
            resp.release()  # the body is incomplete, so this closes the connection
            if isinstance(exc, ConnectionLost):
                raise AttemptFailed(Outcome.RESET, f"body cut off: {exc}", sent=True) from None
            if isinstance(exc, BadResponse):
                raise AttemptFailed(Outcome.BAD_RESPONSE, str(exc), sent=True) from None
            raise
        if len(data) > BUFFER_LIMIT:
            return Reply(resp.status, resp.headers, data, resp)
        resp.release()
        return Reply(resp.status, resp.headers, data)


def outcome_of(value: Response | UpstreamError) -> Reply | AttemptFailed:
    """What an exchange's end means for the request: a reply, or a typed failure saying
    whether the gateway may have seen the request."""
    if isinstance(value, Response):
        if value.streaming:
            return Reply(value.status, value.headers, value.body, value)
        return Reply(value.status, value.headers, value.body)
    if isinstance(value, ConnectFailed):
        return AttemptFailed(Outcome.CONNECT_FAILURE, str(value), sent=False)
    if isinstance(value, Expired):
        return AttemptFailed(Outcome.TIMEOUT, str(value), sent=True)
    if isinstance(value, BadResponse):
        return AttemptFailed(Outcome.BAD_RESPONSE, str(value), sent=True)
    # ConnectionLost, also on a reused connection before any response byte: the gateway
    # may have read the request, so this is never "provably unsent".
    return AttemptFailed(Outcome.RESET, str(value), sent=True)
