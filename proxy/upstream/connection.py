"""One kept-alive HTTP/1.1 connection to a gateway, and the answer read from it.

Owns: one exchange at a time on one connection — the request written in one
`transport.write`, the phase it reached (`Progress`: writing → sent when the transport
buffer is empty → answered on the final response head), the response parsed by httptools
under limits (1xx skipped, HEAD/204/304 bodiless), the outcome reported through a future
with no task of its own, and whether the connection may carry another exchange.
Must not: choose, open or pool connections (proxy.upstream.client does), retry, or judge
what a failure means for a payment (proxy.forward does).
"""

from __future__ import annotations

import asyncio
import logging
import select
import socket
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final, cast

from httptools import HttpParserError, HttpParserUpgrade, HttpResponseParser

from proxy.upstream.phase import Phase, Progress
from proxy.upstream.response import (
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    Expired,
    Response,
    UpstreamError,
)

if TYPE_CHECKING:
    from proxy.upstream.client import Pool

logger = logging.getLogger(__name__)

MAX_STATUS_LINE: Final = 8190
MAX_HEADERS: Final = 128
MAX_HEAD_BYTES: Final = 64 * 1024
#: A streamed body stops being read from the gateway while this much waits for the client.
HIGH_WATER: Final = 256 * 1024
#: Readable (a FIN reads as end of file, stray bytes as data), peer closed, or an error.
_STALE = select.POLLIN | select.POLLPRI | getattr(select, "POLLRDHUP", 0x2000)
#: TLS alerts a gateway's TLS layer sends when it refuses the handshake. In TLS 1.3 the
#: client's side of the handshake ends before the server has checked the client's
#: certificate, so the refusal arrives after the request was written — yet the server
#: decrypts no application data from a peer it refused: the request was never read.
_TLS_REFUSALS = frozenset(
    {
        "TLSV13_ALERT_CERTIFICATE_REQUIRED",
        "SSLV3_ALERT_BAD_CERTIFICATE",
        "SSLV3_ALERT_CERTIFICATE_UNKNOWN",
        "SSLV3_ALERT_CERTIFICATE_EXPIRED",
        "SSLV3_ALERT_CERTIFICATE_REVOKED",
        "SSLV3_ALERT_UNSUPPORTED_CERTIFICATE",
        "TLSV1_ALERT_UNKNOWN_CA",
        "TLSV1_ALERT_ACCESS_DENIED",
        "SSLV3_ALERT_HANDSHAKE_FAILURE",
    }
)


Convert = Callable[[Response | UpstreamError], Any]


def _same(value: Response | UpstreamError) -> Response | UpstreamError:
    return value


class Connection(asyncio.Protocol):
    """One connection to an origin, carrying one exchange at a time."""

    def __init__(self, pool: Pool, sock: socket.socket) -> None:
        self.pool = pool
        # Looked at before a reuse, for a close already received: a poll is cheaper than a
        # peek, which raises on a live socket. Registered once; never polled once closed.
        self.poller = select.poll()
        self.poller.register(sock.fileno(), _STALE)
        self.sock = sock
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.parser = HttpResponseParser(self)
        self.parser_spent = False  # after HEAD it still expects the announced body
        self.waiter: asyncio.Future[None] | None = None
        self.result: asyncio.Future[Any] | None = None
        self.convert: Convert = _same
        self.progress: Progress | None = None
        self.resend: bytes | None = None  # set while a lost reuse may be sent again
        self.limit = 0
        self.timer: asyncio.TimerHandle | None = None
        self.busy = False
        self.reused = False  # has carried a complete exchange before this one
        self.idle_since = 0.0
        self.counted = True  # holds one of its pool's connection slots
        # Bound once: every exchange hands these to the loop and to its future.
        self._on_expire = self._expire
        self._on_cancelled = self._cancelled
        self.reset(head_only=False)

    def reset(self, *, head_only: bool) -> None:
        self.head_only = head_only
        self.error: UpstreamError | None = None
        self.raw: list[tuple[str, str]] = []
        self.reason_len = self.header_bytes = self.head_bytes = self.buffered = self.status = 0
        self.length: int | None = None
        self.chunks: list[bytes] = []
        self.chunked = self.interim = self.paused = False
        self.head_done = self.done = self.keep_alive = False

    def gone(self) -> bool:
        """Has the gateway already closed or reset this idle connection, or sent bytes no
        one asked for? A close received before the write proves the request unread."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return True  # also keeps a closed descriptor's number from being polled
        # Anything at all: the gateway's FIN or RST, or bytes that answer nothing.
        return bool(self.poller.poll(0))

    def exchange(
        self,
        fut: asyncio.Future[Any],
        data: bytes,
        head_only: bool,
        limit: int,
        within: float,
        convert: Convert,
        progress: Progress | None,
    ) -> None:
        """Write `data` and report the exchange through `fut`: `convert` of the Response
        (body read whole up to `limit` bytes, else streaming) or of the UpstreamError that
        ended it; past `within` seconds that error is `Expired`. Cancelling `fut` closes
        the connection."""
        if self.parser_spent:
            self.parser, self.parser_spent = HttpResponseParser(self), False
        self.reset(head_only=head_only)
        self.busy = True
        self.result, self.limit, self.convert, self.progress = fut, limit, convert, progress
        self.timer = self.loop.call_later(within, self._on_expire)
        fut.add_done_callback(self._on_cancelled)
        transport = self.transport
        assert transport is not None
        if progress is not None:
            progress.advance(Phase.WRITING)
            transport.write(data)
            if not transport.get_write_buffer_size():
                progress.advance(Phase.SENT)
        else:
            transport.write(data)

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
        self.progress = None
        if self.done and self.keep_alive and not self.paused and self.transport is not None:
            self.idle_since = self.loop.time()
            self.reused = True
            self.pool.put(self)
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
        """Resolve the exchange's future once its outcome is known: the whole body in, more
        body than the caller buffers (then it streams), or a failure."""
        fut = self.result
        if fut is None:
            return
        if fut.done():  # cancelled by the caller
            self.result = None
            return
        progress = self.progress
        if self.error is not None:
            if (
                self.resend is not None
                and isinstance(self.error, ConnectionLost)
                and not self.head_bytes
                and self._hand_over(fut)
            ):
                return
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
        self._detach()
        value = self.convert(outcome)
        if isinstance(outcome, Response) and not outcome.streaming:
            outcome.release()
        fut.set_result(value)
        if progress is not None and progress.waker is not None:
            progress.waker()

    def _hand_over(self, fut: asyncio.Future[Any]) -> bool:
        """A reused connection closed with no byte of an answer: RFC 9112 §9.3.1 lets an
        idempotent request be sent again, once, on a fresh connection."""
        data, self.resend = self.resend, None
        assert data is not None
        timer = self.timer
        remaining = timer.when() - self.loop.time() if timer is not None else 0.0
        if remaining <= 0:
            return False
        self._detach()
        fut.remove_done_callback(self._on_cancelled)
        self.pool.resend(
            fut,
            data,
            head_only=self.head_only,
            limit=self.limit,
            within=remaining,
            convert=self.convert,
            progress=self.progress,
            first=cast(ConnectionLost, self.error),
        )
        return True

    def _detach(self) -> None:
        self.result = None
        self.resend = None
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def _expire(self) -> None:
        self.timer = None
        self.resend = None
        self._fail(Expired("no complete answer within the time given"))
        self._settle()

    def _cancelled(self, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self._detach()
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
        # Told the moment the write buffer empties: that is when the request is all sent.
        self.transport.set_write_buffer_limits(high=0)

    def connection_lost(self, exc: Exception | None) -> None:
        self.pool.forget(self)
        self.transport = None
        if not self.busy or self.done:
            return
        if self.head_done and exc is None and self.length is None and not self.chunked:
            self._complete()  # a body without framing ends when the gateway closes
            self._settle()
        elif (
            isinstance(exc, ssl.SSLError)
            and exc.reason in _TLS_REFUSALS
            and not self.reused
            and not self.head_bytes
        ):
            self._fail(ConnectFailed(f"the gateway refused the TLS handshake: {exc}"))
        else:
            where = "body cut off, connection lost" if self.head_done else "connection lost"
            self._fail(ConnectionLost(f"{where}: {exc or 'closed by the gateway'}"))

    def resume_writing(self) -> None:
        if self.progress is not None:
            self.progress.advance(Phase.SENT)

    def data_received(self, data: bytes) -> None:
        if not self.busy or self.done:
            # Bytes nobody asked for: this connection's framing can no longer be trusted.
            if not self.busy:
                self.pool.forget(self)
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
            head_bytes = self.head_bytes
            self.reset(head_only=self.head_only)
            self.head_bytes = head_bytes  # an answer has begun: never sent again
            self.interim = True
            return
        self.status = status
        self.keep_alive = parser.should_keep_alive() and parser.get_http_version() == "1.1"
        self.head_done = True
        if self.progress is not None:
            self.progress.advance(Phase.ANSWERED)
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
