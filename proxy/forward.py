"""One HTTP exchange with one gateway: the endpoint stage of the request path.

Owns: building the upstream request (hop-by-hop headers removed, X-Forwarded-* added),
sending it once on the pooled client session, reading a small response whole (so a gateway
that dies mid-body is a failed attempt, not a truncated answer to the client), and turning
every client failure into a typed `AttemptFailed` that says whether the request may have
reached the gateway.
Must not: retry, pick gateways or touch health; it makes exactly one attempt.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.config.model import Gateway
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
    stream: aiohttp.ClientResponse | None = None

    def release(self) -> None:
        if self.stream is not None:
            self.stream.release()
            self.stream = None


def hop_by_hop(headers: CIMultiDictProxy[str]) -> frozenset[str]:
    conn = headers.get("Connection")
    if not conn:
        return HOP_BY_HOP
    named = {t.strip().lower() for t in conn.split(",") if t.strip()}
    return HOP_BY_HOP | named


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


def new_session(*, limit_per_host: int = 0) -> aiohttp.ClientSession:
    """The one pooled keep-alive client session every attempt shares."""
    connector = aiohttp.TCPConnector(
        limit=0,
        limit_per_host=limit_per_host,
        keepalive_timeout=15.0,
        enable_cleanup_closed=False,
        ttl_dns_cache=10,
    )
    return aiohttp.ClientSession(
        connector=connector,
        auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
        skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
        timeout=aiohttp.ClientTimeout(total=None),
        raise_for_status=False,
    )


class Forwarder:
    __slots__ = ("_session", "_timeouts")

    def __init__(self, session: aiohttp.ClientSession) -> None:
        self._session = session
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}

    def _timeout(self, connect: float) -> aiohttp.ClientTimeout:
        t = self._timeouts.get(connect)
        if t is None:
            t = self._timeouts[connect] = aiohttp.ClientTimeout(
                total=None, sock_connect=connect, connect=connect
            )
        return t

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

        Raises AttemptFailed. Cancellation (the caller's per-try timer) propagates as is:
        the caller knows whether the request was already on its way.
        """
        url = URL(gw.url + path_qs, encoded=True)
        try:
            resp = await self._session.request(
                method,
                url,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                timeout=self._timeout(connect_timeout),
                compress=False,
            )
        except aiohttp.ClientConnectorError as exc:
            raise AttemptFailed(
                Outcome.CONNECT_FAILURE, f"connect failed: {exc.os_error}", sent=False
            ) from None
        except aiohttp.ConnectionTimeoutError:
            raise AttemptFailed(Outcome.CONNECT_FAILURE, "connect timed out", sent=False) from None
        except aiohttp.ServerTimeoutError:
            raise AttemptFailed(Outcome.TIMEOUT, "read timed out", sent=True) from None
        except (
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientOSError,
            aiohttp.ClientPayloadError,
        ) as exc:
            raise AttemptFailed(Outcome.RESET, f"connection lost: {exc}", sent=True) from None
        except aiohttp.ClientResponseError as exc:
            raise AttemptFailed(
                Outcome.BAD_RESPONSE, f"invalid response: {exc.message}", sent=True
            ) from None
        except aiohttp.ClientError as exc:
            raise AttemptFailed(Outcome.BAD_RESPONSE, f"client error: {exc!r}", sent=True) from None
        length = resp.content_length
        if length is not None and length > BUFFER_LIMIT:
            return Reply(resp.status, resp.headers, None, resp)
        try:
            if length is not None:
                data = await resp.read()
            else:
                data = await _read_up_to(resp, BUFFER_LIMIT)
                if len(data) > BUFFER_LIMIT:
                    return Reply(resp.status, resp.headers, data, resp)
        except (
            aiohttp.ClientPayloadError,
            aiohttp.ClientOSError,
            aiohttp.ServerDisconnectedError,
        ) as exc:
            resp.release()
            raise AttemptFailed(Outcome.RESET, f"response body cut off: {exc}", sent=True) from None
        except asyncio.CancelledError:
            resp.close()
            raise
        return Reply(resp.status, resp.headers, data)


async def _read_up_to(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """Read an unsized body until it ends or passes `limit` (then the rest is streamed)."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in resp.content.iter_any():
        chunks.append(chunk)
        size += len(chunk)
        if size > limit:
            break
    data = b"".join(chunks)
    if size <= limit:
        resp.release()
    return data
