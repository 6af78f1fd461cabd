"""A lean pooled HTTP/1.1 client: one request and its response on a kept-alive connection.

Owns: idle connections per (scheme, host, port) origin, closed after an idle timeout or as
soon as the gateway closes them; the request written in one `transport.write`; the response
parsed by httptools under limits, 1xx skipped, HEAD/204/304 bodiless; reuse only after a
complete HTTP/1.1 response that did not ask to close.
Must not: retry, time the exchange (the caller bounds it) or judge outcomes. It raises
`ConnectFailed` (nothing was written), `ConnectionLost` or `BadResponse`; `forward` decides
what each means for a payment. aiohttp's ClientSession is not used here because its generic
machinery (request/response objects, auto headers, connector bookkeeping, timers) cost
more CPU per proxied request than the rest of the request path.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser
from multidict import CIMultiDict, CIMultiDictProxy

logger = logging.getLogger(__name__)

Origin = tuple[str, str, int]  # scheme, host, port
T = TypeVar("T")

MAX_STATUS_LINE = 8190
MAX_HEADERS = 128
MAX_HEAD_BYTES = 64 * 1024
#: A streamed body stops being read from the gateway while this much waits for the client.
HIGH_WATER = 256 * 1024
#: Methods whose request carries a Content-Length even when the body is empty.
_LENGTH_REQUIRED = frozenset({"POST", "PUT", "PATCH"})
_DEFAULT_PORT = {"http": 80, "https": 443}
_FRAMING = ("host", "content-length", "transfer-encoding")


class UpstreamError(Exception):
    """The exchange failed; the subclass says how far it got."""


class ConnectFailed(UpstreamError):
    """No connection was made, so no byte of the request was written."""


class ConnectionLost(UpstreamError):
    """The connection ended before the response was complete."""


class BadResponse(UpstreamError):
    """The gateway's answer is not HTTP/1.1 we accept."""


class Expired(UpstreamError):
    """The exchange outlived the time its caller gave it; the connection was closed."""


def _same(value: Response | UpstreamError) -> Response | UpstreamError:
    return value


class _Connection(asyncio.Protocol):
    """One connection to an origin, carrying one exchange at a time."""

    def __init__(self, client: UpstreamClient, origin: Origin) -> None:
        self.client = client
        self.origin = origin
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.parser_spent = False  # after HEAD it still expects the announced body
        self.waiter: asyncio.Future[None] | None = None
        # An exchange reported through a future rather than awaited by a task (`begin`).
        self.result: asyncio.Future[Any] | None = None
        self.convert: Callable[[Response | UpstreamError], Any] = _same
        self.limit = 0
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.idle_since = 0.0
        self.begin(head_only=False)

    def begin(self, *, head_only: bool) -> None:
        self.head_only = head_only
        self.error: UpstreamError | None = None
        self.raw: list[tuple[str, str]] = []
        self.reason_len = self.header_bytes = self.head_bytes = self.buffered = self.status = 0
        self.length: int | None = None
        self.chunks: list[bytes] = []
        self.chunked = self.interim = self.paused = False
        self.head_done = self.done = self.keep_alive = False

    def send(self, data: bytes, *, head_only: bool) -> None:
        if self.parser_spent:
            self.parser, self.parser_spent = HttpResponseParser(self), False
        self.begin(head_only=head_only)
        self.busy = True
        assert self.transport is not None
        self.transport.write(data)

    async def until(self, ready: bool) -> None:
        """Wait for the next event of the exchange; raise if it failed."""
        if not ready:
            if self.error is None:
                waiter = self.waiter = self.loop.create_future()
                try:
                    await waiter
                finally:
                    self.waiter = None
            if self.error is not None:
                raise self.error

    def take(self) -> list[bytes]:
        """The body bytes received so far; reading resumes if it was paused."""
        chunks = self.chunks
        if not chunks:
            return []
        self.chunks, self.buffered = [], 0
        if self.paused and self.transport is not None:
            self.paused = False
            self.transport.resume_reading()
        return chunks

    def finish(self) -> None:
        """The exchange is over: keep the connection for the next one, or close it."""
        self.busy = False
        transport = self.transport
        if self.done and self.keep_alive and not self.paused and transport is not None:
            self.idle_since = self.loop.time()
            self.client._put(self)
        else:
            self.abort()

    def abort(self) -> None:
        self.keep_alive = False
        if self.transport is not None:
            self.transport.abort()

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _settle(self) -> None:
        """Resolve a future-reported exchange once its outcome is known: the whole body in,
        more body than the caller buffers (then it streams), or a failure."""
        fut = self.result
        if fut is None:
            return
        if fut.done():  # cancelled by the caller
            self.result = None
            return
        if self.error is not None:
            outcome: Response | UpstreamError = self.error
        elif self.done:
            outcome = Response(self)
            outcome.body = b"".join(self.take())
        elif self.head_done and (
            self.buffered > self.limit or (self.length is not None and self.length > self.limit)
        ):
            outcome = Response(self)
            outcome.body = b"".join(self.take())
            outcome.streaming = True
        else:
            return
        self.result = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        value = self.convert(outcome)
        if isinstance(outcome, Response) and not outcome.streaming:
            outcome.release()
        fut.set_result(value)

    def _expire(self) -> None:
        self.timer = None
        self._fail(Expired("no complete answer within the time given"))
        self._settle()

    def _cancelled(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self.result = None
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self.busy = False
            self.abort()

    def _fail(self, error: UpstreamError) -> None:
        self.error = self.error or error
        self.abort()
        self._wake()
        self._settle()

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; both set TCP_NODELAY.
        self.transport = cast(asyncio.Transport, transport)
        self.client._conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.client._forget(self)
        self.transport = None
        if not self.busy or self.done:
            return
        if self.head_done and exc is None and self.length is None and not self.chunked:
            self._complete()  # a body without framing ends when the gateway closes
            self._settle()
        else:
            self._fail(ConnectionLost(f"connection lost: {exc or 'closed by the gateway'}"))

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:
            # Bytes nobody asked for: this connection's framing can no longer be trusted.
            if not self.busy:
                self.client._forget(self)
            self.abort()
            return
        if not self.head_done:
            self.head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            self._fail(BadResponse("the gateway switched protocols"))
        except HttpParserError as exc:
            self._parse_failed(exc)
        else:
            # Also bounds a head that never ends (headers are counted as they complete).
            if not self.head_done and self.head_bytes > 2 * MAX_HEAD_BYTES:
                self._fail(BadResponse(f"response head exceeds {MAX_HEAD_BYTES} bytes"))
        if self.result is not None:
            self._settle()

    def _parse_failed(self, exc: HttpParserError) -> None:
        if self.done:
            self.keep_alive = False  # bytes after a complete response
        else:
            self._fail(self.error or BadResponse(f"invalid response: {exc}"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.done:
            raise HttpParserError("a second response to one request")

    def on_status(self, status: bytes) -> None:
        self.reason_len += len(status)
        if self.reason_len > MAX_STATUS_LINE:
            self.error = BadResponse(f"status line exceeds {MAX_STATUS_LINE} bytes")
            raise self.error

    def on_header(self, name: bytes, value: bytes) -> None:
        self.header_bytes += len(name) + len(value)
        if len(self.raw) >= MAX_HEADERS or self.header_bytes > MAX_HEAD_BYTES:
            self.error = BadResponse(
                f"response headers exceed {MAX_HEADERS} fields or {MAX_HEAD_BYTES} bytes"
            )
            raise self.error
        if len(name) in (14, 17):
            low = name.lower()
            if low == b"content-length":
                self.length = int(value)
            elif low == b"transfer-encoding":
                self.chunked = value.rstrip().lower().endswith(b"chunked")
        self.raw.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        parser = self.parser
        status = parser.get_status_code()
        if status < 200:
            # 100 Continue, 103 Early Hints: the final answer follows on the same connection.
            self.begin(head_only=self.head_only)
            self.interim = True
            return
        self.status = status
        self.keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        self.head_done = True
        if self.head_only:
            self.parser_spent = True
            self._complete()
        else:
            self._wake()

    def on_body(self, body: bytes) -> None:
        if self.done:
            self.keep_alive = False  # a body after a HEAD response
            return
        self.chunks.append(body)
        self.buffered += len(body)
        # While a future-reported exchange buffers up to its limit, reading goes on.
        if (
            self.buffered > HIGH_WATER
            and self.result is None
            and not self.paused
            and self.transport is not None
        ):
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
        elif not self.done:
            self._complete()

    def _complete(self) -> None:
        self.done = True
        self._wake()


class Response:
    """A gateway's answer: status and headers now, the body as it arrives.

    Offers what the handler's streaming code reads (`content.iter_any()`, `content_length`,
    `release()`). Release it always: a complete response returns its connection to the pool,
    anything else closes it.
    """

    __slots__ = ("_conn", "body", "content_length", "headers", "status", "streaming")

    def __init__(self, conn: _Connection) -> None:
        self._conn: _Connection | None = conn
        self.body = b""  # with `begin`: the whole body, or what came before streaming
        self.streaming = False
        self.status = conn.status
        self.headers: CIMultiDictProxy[str] = CIMultiDictProxy(CIMultiDict(conn.raw))
        bodiless = conn.head_only or conn.status in (204, 304)
        self.content_length = 0 if bodiless else None if conn.chunked else conn.length

    @property
    def content(self) -> Response:
        return self

    async def read_up_to(self, limit: int) -> bytes:
        """The body if it ends within `limit` bytes; else the first `limit` + 1 or more."""
        conn = self._conn
        assert conn is not None
        parts = conn.take()
        size = sum(map(len, parts))
        while size <= limit and not conn.done:
            await conn.until(bool(conn.chunks) or conn.done)
            chunks = conn.take()
            parts += chunks
            size += sum(map(len, chunks))
        return b"".join(parts)

    async def iter_any(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None
        while True:
            await conn.until(bool(conn.chunks) or conn.done)
            if not conn.chunks:
                return
            yield b"".join(conn.take())

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()

    def __del__(self) -> None:
        # Never released (an abandoned attempt's answer): the connection cannot be reused.
        if self._conn is not None and not self._conn.loop.is_closed():
            self._conn.abort()


class UpstreamClient:
    """Pooled keep-alive connections to any number of origins."""

    def __init__(self, *, idle_timeout: float = 15.0, max_idle: int = 256) -> None:
        self._idle_timeout = idle_timeout
        self._max_idle = max_idle  # per origin
        self._idle: dict[Origin, dict[_Connection, None]] = {}  # insertion order: LIFO reuse
        self._conns: set[_Connection] = set()
        self._host_lines: dict[Origin, str] = {}
        self._sweeper: asyncio.TimerHandle | None = None
        self._tls: ssl.SSLContext | None = None
        self._closed = False

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        connect_timeout: float,
    ) -> Response:
        """Send one request; return once the response head is in.

        Cancelled or failed at any point, the connection is closed, never pooled mid-exchange.
        """
        data = self._encode(origin, method, target, headers, body)
        conn = self._take_idle(origin) or await self._connect(origin, connect_timeout)
        try:
            conn.send(data, head_only=method == "HEAD")
            while not conn.head_done:
                await conn.until(False)
            return Response(conn)
        except BaseException:
            conn.busy = False
            conn.abort()
            raise

    def begin(
        self,
        conn: _Connection,
        data: bytes,
        *,
        head_only: bool,
        limit: int,
        within: float,
        convert: Callable[[Response | UpstreamError], T],
    ) -> asyncio.Future[T]:
        """Write `data` on `conn` and report the exchange through a future, with no task
        of its own: it resolves to `convert` of the Response (body read whole up to `limit`
        bytes, else streaming) or of the UpstreamError that ended it; past `within` seconds
        that error is `Expired`. Cancelling the future closes the connection."""
        fut: asyncio.Future[T] = conn.loop.create_future()
        conn.send(data, head_only=head_only)
        conn.result, conn.limit, conn.convert = fut, limit, convert
        conn.timer = conn.loop.call_later(within, conn._expire)
        fut.add_done_callback(conn._cancelled)
        return fut

    def idle(self, origin: Origin) -> _Connection | None:
        """A pooled connection to `origin` ready for a request, if there is one."""
        return self._take_idle(origin)

    async def connect(self, origin: Origin, connect_timeout: float) -> _Connection:
        """A new connection to `origin`; raises ConnectFailed."""
        return await self._connect(origin, connect_timeout)

    def encode(
        self, origin: Origin, method: str, target: str, headers: CIMultiDict[str], body: bytes
    ) -> bytes:
        """The request as bytes for one write; ValueError for a head that would split."""
        return self._encode(origin, method, target, headers, body)

    def idle_count(self, origin: Origin) -> int:
        return len(self._idle.get(origin, ()))

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self._conns):
            conn.abort()
        self._idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing their sockets

    def _encode(
        self, origin: Origin, method: str, target: str, headers: CIMultiDict[str], body: bytes
    ) -> bytes:
        host_line = self._host_lines.get(origin)
        if host_line is None:
            host_line = self._host_lines[origin] = _host_line(origin)
        if "Host" in headers or "Content-Length" in headers or "Transfer-Encoding" in headers:
            # Host and framing are ours: the gateway is chosen here and the body is buffered.
            headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _FRAMING)
        lines = [f"{method} {target} HTTP/1.1", host_line, *map(": ".join, headers.items())]
        if body or method in _LENGTH_REQUIRED:
            lines.append(f"Content-Length: {len(body)}")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
        # One CR LF per line plus the blank line: any other CR or LF would split a header.
        if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
            raise ValueError("CR or LF inside the request line or a header")
        return head + body if body else head

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        cutoff = asyncio.get_running_loop().time() - self._idle_timeout
        while idle:
            conn, _ = idle.popitem()  # the most recently used: the least likely to be stale
            transport = conn.transport
            if conn.idle_since > cutoff and transport is not None and not transport.is_closing():
                return conn
            conn.abort()
        return None

    async def _connect(self, origin: Origin, connect_timeout: float) -> _Connection:
        if self._closed:
            raise ConnectFailed("the upstream client is closed")
        scheme, host, port = origin
        made: list[_Connection] = []

        def factory() -> _Connection:
            made.append(_Connection(self, origin))
            return made[-1]

        if scheme == "https" and self._tls is None:
            self._tls = ssl.create_default_context()
        tls = self._tls if scheme == "https" else None
        try:
            async with asyncio.timeout(connect_timeout):
                await asyncio.get_running_loop().create_connection(
                    factory, host, port, ssl=tls, server_hostname=host if tls else None
                )
        except BaseException as exc:
            for conn in made:
                conn.abort()
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"connect to {host}:{port} timed out") from None
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS handshake
                raise ConnectFailed(f"connect to {host}:{port} failed: {exc}") from None
            raise
        return made[0]

    def _put(self, conn: _Connection) -> None:
        idle = self._idle.setdefault(conn.origin, {})
        if self._closed or len(idle) >= self._max_idle:
            conn.abort()
            return
        idle[conn] = None
        if self._sweeper is None:
            self._sweeper = conn.loop.call_later(self._idle_timeout, self._sweep)

    def _forget(self, conn: _Connection) -> None:
        self._conns.discard(conn)
        idle = self._idle.get(conn.origin)
        if idle:
            idle.pop(conn, None)

    def _sweep(self) -> None:
        """Close connections idle past the timeout, so a quiet gateway holds no sockets."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self._idle_timeout
        for idle in self._idle.values():
            for conn in [c for c in idle if c.idle_since <= cutoff]:
                del idle[conn]
                conn.abort()
        pending = any(self._idle.values())
        self._sweeper = loop.call_later(self._idle_timeout / 2, self._sweep) if pending else None


def _host_line(origin: Origin) -> str:
    scheme, host, port = origin
    if ":" in host:
        host = f"[{host}]"
    return f"Host: {host}" if _DEFAULT_PORT.get(scheme) == port else f"Host: {host}:{port}"
