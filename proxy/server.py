"""The traffic listener: a lean HTTP/1.1 server in front of the proxy handler.

Owns: accepting client connections, parsing requests with httptools under limits (request
target, header fields, head size, pipelined requests queued), buffering each request body
for the handler up to the largest any route accepts, writing each answer (whole, or
streamed with Content-Length, chunked or close-delimited framing), keep-alive with an idle
timeout, a read timeout against clients that stall mid-request, `Expect: 100-continue`,
clear problem+json refusals of malformed HTTP, and a graceful close that lets in-flight
requests finish.
Must not: route, retry or account requests (the handler does), or cancel a handler whose
client went away: a payment already sent must run to its end and be recorded.

aiohttp's web server is not used here for the same reason the upstream client is lean:
its generic request/response machinery cost more CPU per proxied request than routing,
retries and accounting together. The admin listener stays on aiohttp.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, Protocol, cast
from urllib.parse import unquote

import orjson
from httptools import HttpParserError, HttpParserUpgrade, HttpRequestParser
from multidict import CIMultiDict, CIMultiDictProxy

logger = logging.getLogger(__name__)

MAX_TARGET = 8190  # request target bytes, as nginx's large_client_header_buffers
MAX_FIELD = 16384  # one header line
MAX_HEADERS = 128
MAX_HEAD_BYTES = 64 * 1024
MAX_PIPELINED = 16  # parsed requests waiting their turn before reading pauses
SLICE = 4096  # bytes parsed at a time when a read is larger: the pipelining check's grain
#: Requests one slice can still hold past MAX_PIPELINED (4096 / 18-byte requests = 228);
#: more are refused (503).
MAX_WAITING = 256
MAX_QUEUED_BODY = 1024 * 1024  # body bytes of waiting requests before reading pauses
KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this long
READ_TIMEOUT = 60.0  # a request head, or a body, must arrive whole within this long
WRITE_TIMEOUT = 60.0  # a client that takes none of its answers this long is cut off
LINGER = 2.0  # after a refusal, what the client still sends is read and dropped this long
SWEEP_INTERVAL = 1.0
#: Answers that never carry a body.
_BODILESS_STATUS = frozenset({204, 304})
_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a reset


class BodyError(Exception):
    """The request body could not be read whole; the subclass says why."""


class ClientClosed(BodyError):
    """The client closed the connection before its request body was complete."""


class BodyOverCap(BodyError):
    """The request body is larger than the cap the handler reads with."""

    def __init__(self, cap: int) -> None:
        super().__init__(f"request body exceeds {cap} bytes")
        self.cap = cap


class MalformedBody(BodyError):
    """The body's framing is broken (bad chunk sizes, say)."""


class BodyTimeout(BodyError):
    """The client stopped sending the body for longer than the read timeout."""


class Stream(Protocol):
    """The rest of an answer's body, as the upstream client delivers it."""

    def iter_any(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...


class Answer:
    """What the handler sends back: status, end-to-end headers and the body.

    `stream`, when set, yields the body after `body`; `length` is then the whole body's
    length if known (Content-Length framing), else the body is chunked.
    """

    __slots__ = ("body", "headers", "length", "status", "stream")

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        stream: Stream | None = None,
        length: int | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream
        self.length = length


Handler = Callable[["Request"], Awaitable[Answer]]


class Request:
    """One client request: the head now, the body as `read` collects it."""

    __slots__ = (
        "_conn",
        "_waiter",
        "body",
        "complete",
        "content_length",
        "error",
        "expect_continue",
        "headers",
        "host",
        "http11",
        "keep_alive",
        "method",
        "over_cap",
        "path",
        "raw_path",
        "remote",
        "scheme",
        "since",
        "size",
    )

    def __init__(
        self,
        conn: _Connection,
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
        keep_alive: bool,
        http11: bool,
    ) -> None:
        self._conn: _Connection | None = conn
        self._waiter: asyncio.Future[None] | None = None
        self.method = method
        self.raw_path = raw_path  # the request target as sent: path and query
        path = raw_path.partition("?")[0]
        self.path = unquote(path) if "%" in path else path
        self.headers = headers
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.http11 = http11
        self.remote = conn.remote
        self.scheme = "http"
        self.host: str | None = headers.get("Host")
        self.expect_continue = False
        # One bytes object for the usual single-piece body; a bytearray once it arrives in
        # pieces, so a body sent in tiny chunks costs its size, not an object per chunk.
        self.body: bytes | bytearray = b""
        self.size = 0
        self.complete = False
        self.over_cap = False
        self.error: BodyError | None = None
        self.since = conn.loop.time()  # when the head was complete

    async def read(self, cap: int) -> bytes:
        """The whole body, or a BodyError: over `cap` bytes, malformed, stalled, or the
        client gone."""
        while not self.complete:
            if self.over_cap or self.size > cap:
                raise BodyOverCap(cap)
            if self.error is not None:
                raise self.error
            conn = self._conn
            if conn is None or conn.transport is None:
                raise ClientClosed("the client closed the connection mid-body")
            if self.expect_continue:
                self.expect_continue = False
                conn.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            waiter = self._waiter = conn.loop.create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        if self.over_cap or self.size > cap:
            raise BodyOverCap(cap)
        body = self.body
        if isinstance(body, bytearray):
            body = self.body = bytes(body)
        return body

    def _add(self, piece: bytes) -> None:
        body = self.body
        if not body:
            self.body = piece
        elif isinstance(body, bytearray):
            body += piece
        else:
            self.body = bytearray(body)
            self.body += piece

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


class _Refusal(Exception):
    """A request refused before it reaches the handler: malformed or over a limit."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed in order, answered one at a time.

    Reading stays on while the current request's body is arriving; it pauses while parsed
    requests wait their turn beyond MAX_PIPELINED or MAX_QUEUED_BODY bytes, and while the
    client is not reading its answers (the next request is not started until it does).
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.parser = HttpRequestParser(self)
        self.incoming: Request | None = None  # the request whose body is arriving
        self.waiting: deque[Request] = deque()  # parsed, not yet handed to the handler
        self.backlog = b""  # received, not yet parsed: the pipelining limits were reached
        self.current: Request | None = None  # with the handler now
        self.refusal: _Refusal | None = None  # answered once the current request is done
        self.stop_parsing = False  # nothing more is read as requests on this connection
        self.last_answer = False  # the answer being written says Connection: close
        self.aborted = False
        self.read_paused = False
        self.write_paused = False
        self.write_paused_at = 0.0
        self.held = False  # the next request waits until the client reads its answers
        self.drain: asyncio.Future[None] | None = None
        self.closing_at: float | None = None  # when close() was asked, for the sweep
        self.linger_until: float | None = None
        self.eof = False  # the client half-closed
        now = self.loop.time()
        self.idle_since = now
        self.head_since = now
        self.unparsed = 0  # bytes fed since the parser last completed anything
        self._reset_head()

    def _reset_head(self) -> None:
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.field_count = 0  # of the head, then (reset) of the trailers
        self.head_bytes = 0
        self.length: int | None = None
        self.chunked = False
        self.expect = False
        self.hosts = 0
        self.in_head = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        server = self.server
        server.conns.discard(self)
        if server.closing and not server.conns:
            server._all_gone.set()
        self.waiting.clear()
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming._wake()  # its `read` sees the connection gone
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def eof_received(self) -> bool:
        """The client half-closed: answer what was received whole, then close."""
        if self.backlog and not self.stop_parsing:
            data, self.backlog = self.backlog, b""
            self._parse(data)  # at most one read more than the limits: parsed now
        self.eof = True
        self.stop_parsing = True
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.error = ClientClosed("the client closed the connection mid-body")
            incoming._wake()
            if incoming in self.waiting:
                self.waiting.remove(incoming)
        # Keep the write side open for the answers still owed; else close now.
        owed = self.current is not None or bool(self.waiting)
        return owed and self.linger_until is None

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        if self.held:
            self.held = False
            self._next()

    def data_received(self, data: bytes) -> None:
        if self.stop_parsing:
            return  # after a refusal or an upgrade: read and dropped (lingering close)
        if self.backlog:
            self.backlog += data  # a read that raced the pause
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse `data`; past the pipelining limits, keep the rest for later instead.

        A large read is parsed in slices, so a client pipelining many small requests in
        one write is paused between them rather than parsed all at once (httptools cannot
        stop part-way through what it is given). The rest of a body of known length holds
        no new request, so it goes to the parser in one piece.
        """
        size = len(data)
        if size <= SLICE:
            self._parse(data)
            return
        view = memoryview(data)
        start = 0
        while start < size:
            if self.stop_parsing:
                return
            if start and not self._room():
                self.backlog = bytes(view[start:])
                self._update_reading()
                return
            step = SLICE
            incoming = self.incoming
            if incoming is not None and incoming.content_length is not None:
                step = max(SLICE, incoming.content_length - incoming.size)
            self._parse(view[start : start + step])
            start += step

    def _room(self) -> bool:
        """May more requests be parsed while earlier ones wait their turn?"""
        waiting = self.waiting
        return (
            len(waiting) < MAX_PIPELINED
            and sum(r.size for r in waiting if not r.over_cap) <= MAX_QUEUED_BODY
        )

    def _parse(self, data: bytes | memoryview) -> None:
        self.unparsed += len(data)
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            # The bodiless request before the new protocol was parsed (one with a body is
            # refused in on_headers_complete); it is answered over HTTP/1.1, then the
            # connection closes: no protocol switch is offered.
            self.stop_parsing = True
            self._update_reading()
        except _Refusal as exc:
            self._refuse(exc)
        except HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause)
            else:
                self._refuse(_Refusal(400, f"malformed HTTP request: {exc}"))
        else:
            # httptools gathers a header line (or a trailer) across reads before calling
            # back: bound what it can hold without completing anything.
            if self.unparsed > MAX_HEAD_BYTES:
                self._refuse(_Refusal(431, f"request head exceeds {MAX_HEAD_BYTES} bytes"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_head()
        self.in_head = True
        self.head_since = self.loop.time()

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > MAX_TARGET:
            raise _Refusal(414, f"request target exceeds {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if size > MAX_FIELD:
            raise _Refusal(431, f"a header field exceeds {MAX_FIELD} bytes")
        self.unparsed = 0
        self.head_bytes += size
        self.field_count += 1
        if self.field_count > MAX_HEADERS or self.head_bytes > MAX_HEAD_BYTES:
            what = "header" if self.in_head else "trailer"
            raise _Refusal(
                431, f"more than {MAX_HEADERS} {what} fields or {MAX_HEAD_BYTES} bytes of them"
            )
        if not self.in_head:
            return  # a trailer of a chunked body: counted like the head, otherwise ignored
        fields = self.fields
        fields.append((name, value))
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            self.length = int(value)  # httptools has checked it is a number
        elif n == 17 and name.lower() == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise _Refusal(501, "only the chunked transfer coding is supported")
            self.chunked = True
        elif n == 4 and name.lower() == b"host":
            self.hosts += 1
        elif n == 6 and name.lower() == b"expect":
            if value.strip().lower() != b"100-continue":
                raise _Refusal(417, "only Expect: 100-continue is supported")
            self.expect = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise _Refusal(505, f"HTTP/{version} is not supported; use HTTP/1.1")
        http11 = version == "1.1"
        if self.hosts > 1 or (http11 and self.hosts == 0):
            raise _Refusal(400, "an HTTP/1.1 request needs exactly one Host header")
        if parser.should_upgrade() and (self.length or self.chunked):
            # llhttp would hand the body over as the new protocol's bytes: refuse rather
            # than forward a payment without its body.
            raise _Refusal(400, "a protocol upgrade with a request body is not supported")
        headers = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in self.fields]
        )
        req = Request(
            self,
            parser.get_method().decode("ascii"),
            self.target.decode("utf-8", "surrogateescape"),
            CIMultiDictProxy(headers),
            self.length,
            parser.should_keep_alive(),
            http11,
        )
        req.expect_continue = self.expect and http11
        self.in_head = False
        self.unparsed = 0
        self.head_bytes = self.field_count = 0
        self.incoming = req
        if self.current is None and not self.held:
            self._start(req)
        elif len(self.waiting) >= MAX_WAITING:
            raise _Refusal(503, f"more than {MAX_WAITING} pipelined requests waiting")
        else:
            self.waiting.append(req)
            self._update_reading()

    def on_body(self, body: bytes) -> None:
        self.unparsed = 0
        req = self.incoming
        if req is None or req.over_cap:
            return
        req.size += len(body)
        if req.size > self.server.body_cap():
            # Nothing more is kept; the handler refuses it and the connection closes.
            req.over_cap = True
            req.body = b""
            self.stop_parsing = True
            self._update_reading()
        else:
            req._add(body)
            if req is not self.current:
                self._update_reading()  # a waiting request's body counts against the queue
        req._wake()

    def on_message_complete(self) -> None:
        self.unparsed = 0
        req = self.incoming
        if req is not None:
            req.complete = True
            self.incoming = None
            req._wake()

    # -- serving -----------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self.current = req
        req.since = self.loop.time()  # the body deadline runs from here, not while queued
        server = self.server
        task = self.loop.create_task(self._serve(req))
        server.tasks.add(task)
        task.add_done_callback(server.tasks.discard)

    async def _serve(self, req: Request) -> None:
        try:
            try:
                answer = await self.server.handler(req)
            except Exception:
                logger.exception("request handler failed for %s %s", req.method, req.raw_path)
                answer = problem(
                    500, "Internal proxy error", "the proxy failed this request", "internal"
                )
            try:
                await self._write(req, answer)
            except Exception:
                logger.exception("writing the answer to %s %s failed", req.method, req.raw_path)
                self._abort()
        except BaseException:
            # Cancelled with no answer written: the client must not read the next
            # request's answer as this one's.
            self._abort()
            raise
        finally:
            self._finished(req)

    def _keep(self, req: Request) -> bool:
        """May this connection carry another request after `req`?"""
        return (
            req.keep_alive
            and req.complete
            and not req.over_cap
            and req.error is None
            and not self.server.closing
        )

    def _finished(self, req: Request) -> None:
        req._conn = None
        self.current = None
        self.idle_since = self.loop.time()
        if self.transport is None or self.aborted:
            return
        if self.last_answer or not self._keep(req):
            self._close(lingering=True)
        elif self.write_paused:
            self.held = True  # resume_writing goes on
        else:
            self._next()

    def _next(self) -> None:
        """Serve the next waiting request, or read on; close if nothing more can come."""
        transport = self.transport
        if transport is None or self.aborted or self.current is not None:
            return
        if self.closing_at is not None or transport.is_closing():
            return
        if self.held or self.write_paused:
            self.held = True  # resume_writing goes on
            return
        if self.waiting and self.server.closing:
            self._close()  # draining: what has not started is not started now
        elif self.waiting:
            req = self.waiting.popleft()
            self._start(req)
            if self.backlog and self._room() and not self.stop_parsing:
                data, self.backlog = self.backlog, b""
                self._feed(data)
        elif self.refusal is not None:
            self._send_refusal()
            self._close(lingering=True)
        elif self.stop_parsing:
            self._close()
        self._update_reading()

    def _update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.aborted:
            return
        wanted = not self.stop_parsing and not self.backlog and (not self.waiting or self._room())
        if self.linger_until is not None:
            wanted = True  # draining what the client still sends, to let it read our answer
        if wanted and self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        elif not wanted and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()

    async def _write(self, req: Request, answer: Answer) -> None:
        stream = answer.stream
        transport = self.transport
        if transport is None or self.aborted:
            if stream is not None:
                stream.release()
            return  # the client left; the handler has accounted the request already
        status = answer.status
        # Decided once, before the first byte: the connection ends after this answer when
        # the request says so, or nothing more will be read and nothing more waits.
        close = self.last_answer = not self._keep(req) or (
            self.stop_parsing and not self.waiting and self.refusal is None
        )
        bodiless = req.method == "HEAD" or status in _BODILESS_STATUS or status < 200
        keep10 = not close and not req.http11  # an HTTP/1.0 client asked for keep-alive
        if stream is None:
            body = answer.body
            head = _head(status, answer.headers, None if bodiless else len(body), close, keep10)
            transport.write(head if bodiless or not body else head + body)
            return
        try:
            if bodiless:
                transport.write(_head(status, answer.headers, None, close, keep10))
                return
            length = answer.length
            chunked = length is None and req.http11
            if length is None and not chunked:
                # HTTP/1.0 and no length: the body ends when the connection does.
                close = self.last_answer = True
                keep10 = False
            transport.write(_head(status, answer.headers, length, close, keep10, chunked))
            sent = 0
            if answer.body:
                sent += await self._send(answer.body, chunked)
            async for chunk in stream.iter_any():
                if not chunk:
                    continue  # an empty chunk would end a chunked body early
                if length is not None and sent + len(chunk) > length:
                    raise ValueError(f"the gateway sent more than its {length}-byte body")
                sent += await self._send(chunk, chunked)
            if length is not None and sent != length:
                raise ValueError(f"the gateway's body ended at {sent} of {length} bytes")
            if chunked and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        except ClientClosed:
            logger.debug("client left mid-answer to %s %s", req.method, req.raw_path)
        except Exception as exc:
            # A gateway dying mid-body: cut the client off (with a reset, so even a
            # close-delimited body cannot pass for complete).
            logger.warning("response stream from gateway cut off: %r", exc)
            self._abort()
        finally:
            stream.release()

    async def _send(self, data: bytes, chunked: bool) -> int:
        transport = self.transport
        if transport is None or self.aborted:
            raise ClientClosed("the client closed the connection mid-answer")
        if chunked:
            transport.write(b"%x\r\n%b\r\n" % (len(data), data))
        else:
            transport.write(data)
        if self.write_paused:
            self.drain = self.loop.create_future()
            try:
                await self.drain
            finally:
                self.drain = None
        return len(data)

    def _refuse(self, refusal: _Refusal) -> None:
        """A malformed or over-limit request: answered after the requests before it, then
        the connection closes; nothing after it is parsed."""
        self.stop_parsing = True
        self.in_head = False
        incoming, self.incoming = self.incoming, None
        if incoming is not None and incoming is self.current:
            # Its body broke off mid-way: the handler's read fails and it answers.
            incoming.error = MalformedBody(refusal.detail)
            incoming._wake()
            self._update_reading()
            return
        if incoming is not None and incoming in self.waiting:
            self.waiting.remove(incoming)
        if self.refusal is None:
            self.refusal = refusal
        if self.current is None:
            self._next()
        else:
            self._update_reading()

    def _send_refusal(self) -> None:
        refusal, self.refusal = self.refusal, None
        if refusal is None or self.transport is None:
            return
        status = refusal.status
        title = HTTPStatus(status).phrase
        reason = title.lower().replace(" ", "-")
        answer = problem(status, title, refusal.detail, reason)
        self.transport.write(
            _head(status, answer.headers, len(answer.body), True, False) + answer.body
        )
        self.server.refused += 1
        self.server.on_refusal(reason)

    def _close(self, *, lingering: bool = False) -> None:
        """Close after what is written has gone out. Lingering: first stop sending, then
        read and drop what the client still sends for a moment, so it can read our answer
        instead of a reset for the bytes it had in flight."""
        transport = self.transport
        if transport is None or self.closing_at is not None:
            return
        self.stop_parsing = True
        now = self.loop.time()
        if lingering and not self.eof and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the client is already gone (a reset we have not read yet)
                pass
            else:
                self.linger_until = now + LINGER
                self._update_reading()
                return
        self.closing_at = now
        transport.close()

    def _abort(self) -> None:
        """Cut the connection with a reset; nothing more is served on it."""
        self.aborted = True
        self.stop_parsing = True
        self.waiting.clear()
        transport = self.transport
        if transport is None:
            return
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
        transport.abort()

    def idle(self) -> bool:
        """Between requests, with nothing waiting: safe to close."""
        return (
            self.current is None
            and self.incoming is None
            and not self.in_head
            and not self.waiting
            and not self.backlog
        )

    def sweep(self, now: float) -> None:
        """Enforce the connection's deadlines: keep-alive idle, the request head and body
        (whole, not between bytes: a trickle does not hold a connection), the client
        reading its answers, and lingering and graceful closes."""
        transport = self.transport
        server = self.server
        if transport is None:
            return
        if self.write_paused and now - self.write_paused_at > server.write_timeout:
            self._abort()  # the client stopped reading its answers
        elif self.closing_at is not None:
            if now - self.closing_at > server.write_timeout:
                self._abort()  # a close still waiting for the client to take our bytes
        elif self.linger_until is not None:
            if now > self.linger_until and self.current is None:
                self.closing_at = now
                transport.close()
        elif self.current is None and not self.held:
            if self.in_head:
                if now - self.head_since > server.read_timeout and not self.backlog:
                    self._refuse(_Refusal(408, "the request head did not arrive in time"))
            elif self.idle() and now - self.idle_since > server.keepalive_timeout:
                self.closing_at = now
                transport.close()
        else:
            incoming = self.incoming
            if (
                incoming is self.current
                and incoming is not None
                and incoming.error is None
                and now - incoming.since > server.read_timeout
            ):
                incoming.error = BodyTimeout("the request body did not arrive in time")
                incoming._wake()


class ProxyServer:
    """The traffic listener: `start`, then `close` to drain and stop."""

    def __init__(
        self,
        handler: Handler,
        body_cap: Callable[[], int],
        *,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT,
        read_timeout: float = READ_TIMEOUT,
        write_timeout: float = WRITE_TIMEOUT,
    ) -> None:
        self.handler = handler
        self.body_cap = body_cap  # the most any route accepts, read when a body arrives
        self.keepalive_timeout = keepalive_timeout
        self.read_timeout = read_timeout
        self.write_timeout = write_timeout
        self.conns: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # one per request being served
        self._all_gone = asyncio.Event()  # set once closing and the last connection ended
        self.closing = False
        self.refused = 0  # requests refused before the handler, as malformed or over limits
        #: Told the reason of every refusal (a kebab-case slug), for metrics.
        self.on_refusal: Callable[[str], None] = _ignore
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    async def start(self, host: str, port: int, *, backlog: int = 1024) -> None:
        self.loop = asyncio.get_running_loop()
        self._server = await self.loop.create_server(
            lambda: _Connection(self), host, port, backlog=backlog, reuse_address=True
        )
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    def _sweep(self) -> None:
        now = self.loop.time()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        for conn in list(self.conns):
            try:
                conn.sweep(now)
            except Exception:
                logger.exception("connection sweep failed; closing that connection")
                conn._abort()

    async def close(self, deadline: float = 60.0) -> None:
        """Stop accepting, close idle connections, give in-flight requests `deadline`
        seconds to be answered and their answers to go out, then cut off what is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.idle():
                conn._close()
        end = time.monotonic() + deadline
        while self.tasks and time.monotonic() < end:
            await asyncio.wait(set(self.tasks), timeout=end - time.monotonic())
        for conn in list(self.conns):
            if conn.current is None:
                conn._close()  # after what is written has gone out
        if self.conns:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, end - time.monotonic())):
                    await self._all_gone.wait()
        for conn in list(self.conns):
            conn._abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the transports finish closing their sockets


PROBLEM_TYPES = "https://payswitch.dev/problems/"


def problem_fields(status: int, title: str, detail: str, slug: str) -> dict[str, object]:
    """The RFC 9457 members every payswitch problem body starts with."""
    return {"type": PROBLEM_TYPES + slug, "title": title, "status": status, "detail": detail}


def _ignore(_: str) -> None:
    return None


def problem(status: int, title: str, detail: str, slug: str) -> Answer:
    """A problem+json answer for refusals made before any route is known."""
    body = orjson.dumps(problem_fields(status, title, detail, slug))
    return Answer(status, {"Content-Type": "application/problem+json"}, body)


_STATUS_LINES: dict[int, str] = {}


def _status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = f"HTTP/1.1 {status} {phrase}".rstrip()
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


_date: list[Any] = [0, ""]


def _date_line() -> str:
    """The Date field, formatted once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, "Date: " + formatdate(now, usegmt=True)
    return cast(str, _date[1])


def _head(
    status: int,
    headers: Mapping[str, str],
    length: int | None,
    close: bool,
    keep10: bool,
    chunked: bool = False,
) -> bytes:
    lines = [_status_line(status)]
    lines.extend(map(": ".join, headers.items()))
    if length is not None:
        lines.append(f"Content-Length: {length}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    if "Date" not in headers:
        lines.append(_date_line())
    if close:
        lines.append("Connection: close")
    elif keep10:
        lines.append("Connection: keep-alive")
    lines.append("\r\n")
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    # One CR LF per line plus the blank line: any other CR or LF would split a header.
    if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
        raise ValueError("CR or LF inside a response header")
    return head
