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
import logging
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
KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this long
READ_TIMEOUT = 60.0  # a request whose head or body stalls this long gets 408
SWEEP_INTERVAL = 1.0
#: Methods whose request carries a Content-Length even when the body is empty.
_BODILESS_STATUS = frozenset({204, 304})


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
        "chunks",
        "complete",
        "content_length",
        "error",
        "expect_continue",
        "headers",
        "host",
        "keep_alive",
        "method",
        "over_cap",
        "path",
        "raw_path",
        "remote",
        "scheme",
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
        self.remote = conn.remote
        self.scheme = "http"
        self.host: str | None = headers.get("Host")
        self.expect_continue = False
        self.chunks: list[bytes] = []
        self.size = 0
        self.complete = False
        self.over_cap = False
        self.error: BodyError | None = None

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
        chunks = self.chunks
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

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
    """One client connection: requests parsed in order, answered one at a time."""

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.parser = HttpRequestParser(self)
        self.incoming: Request | None = None  # the request whose head or body is arriving
        self.waiting: deque[Request] = deque()  # parsed, not yet handed to the handler
        self.current: Request | None = None  # with the handler now
        self.refusal: _Refusal | None = None  # answered once the current request is done
        self.stop_parsing = False
        self.read_paused = False
        self.write_paused = False
        self.drain: asyncio.Future[None] | None = None
        self.last_read = self.loop.time()
        self._reset_head()

    def _reset_head(self) -> None:
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.head_bytes = 0
        self.length: int | None = None
        self.expect = False
        self.in_head = False

    # -- asyncio.Protocol --------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        self.server.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self.server.conns.discard(self)
        self.waiting.clear()
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming._wake()  # its `read` sees the connection gone
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.last_read = self.loop.time()
        if self.stop_parsing:
            return
        if self.in_head or self.incoming is None:
            # httptools gathers a header line across reads before calling back: bound it.
            self.head_bytes += len(data)
            if self.head_bytes > 2 * MAX_HEAD_BYTES:
                self._refuse(_Refusal(431, f"request head exceeds {MAX_HEAD_BYTES} bytes"))
                return
        try:
            self.parser.feed_data(data)
        except HttpParserUpgrade:
            # The request before the new protocol was parsed; it is answered over HTTP/1.1
            # and the connection then closes (no protocol switch is offered).
            self.stop_parsing = True
            self._pause_reading()
        except _Refusal as exc:
            self._refuse(exc)
        except HttpParserError as exc:
            cause = exc.__context__
            if isinstance(cause, _Refusal):
                self._refuse(cause)
            else:
                self._refuse(_Refusal(400, f"malformed HTTP request: {exc}"))

    # -- httptools callbacks -----------------------------------------------------------------

    def on_message_begin(self) -> None:
        self._reset_head()
        self.in_head = True

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > MAX_TARGET:
            raise _Refusal(414, f"request target exceeds {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if size > MAX_FIELD:
            raise _Refusal(431, f"a header field exceeds {MAX_FIELD} bytes")
        fields = self.fields
        if len(fields) >= MAX_HEADERS:
            raise _Refusal(431, f"more than {MAX_HEADERS} header fields")
        fields.append((name, value))
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            self.length = int(value)  # httptools has checked it is a number
        elif n == 6 and name.lower() == b"expect":
            if value.strip().lower() != b"100-continue":
                raise _Refusal(417, "only Expect: 100-continue is supported")
            self.expect = True

    def on_headers_complete(self) -> None:
        parser = self.parser
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
        )
        req.expect_continue = self.expect
        self.in_head = False
        self.head_bytes = 0
        self.incoming = req
        if self.current is None:
            self._start(req)
        else:
            self.waiting.append(req)
            if len(self.waiting) >= MAX_PIPELINED:
                self._pause_reading()

    def on_body(self, body: bytes) -> None:
        req = self.incoming
        if req is None or req.over_cap:
            return
        req.size += len(body)
        if req.size > self.server.body_cap():
            # Nothing more is kept; the handler refuses it and the connection closes.
            req.over_cap = True
            req.chunks = []
            self.stop_parsing = True
            self._pause_reading()
        else:
            req.chunks.append(body)
        req._wake()

    def on_message_complete(self) -> None:
        req = self.incoming
        if req is not None:
            req.complete = True
            self.incoming = None
            req._wake()

    # -- serving -----------------------------------------------------------------------------

    def _start(self, req: Request) -> None:
        self.current = req
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
                answer = problem(500, "Internal proxy error", "the proxy failed this request")
            try:
                await self._write(req, answer)
            except Exception:
                logger.exception("writing the answer to %s %s failed", req.method, req.raw_path)
                self._abort()
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

    def _last(self, req: Request) -> bool:
        """Is `req`'s answer the last thing written on this connection?"""
        if not self._keep(req):
            return True
        return self.stop_parsing and not self.waiting and self.refusal is None

    def _finished(self, req: Request) -> None:
        req._conn = None
        self.current = None
        self.last_read = self.loop.time()  # keep-alive idles from the answer on
        transport = self.transport
        if transport is None:
            return
        if self._keep(req):
            if self.waiting:
                self._start(self.waiting.popleft())
                return
            if not self.stop_parsing:
                if self.read_paused:
                    self.read_paused = False
                    transport.resume_reading()
                return
            self._send_refusal()
        transport.close()

    async def _write(self, req: Request, answer: Answer) -> None:
        transport = self.transport
        if transport is None:
            if answer.stream is not None:
                answer.stream.release()
            return  # the client left; the handler has accounted the request already
        status = answer.status
        close = self._last(req)
        bodiless = req.method == "HEAD" or status in _BODILESS_STATUS or status < 200
        stream = answer.stream
        if stream is None:
            body = answer.body
            head = _head(status, answer.headers, None if bodiless else len(body), close)
            transport.write(head if bodiless or not body else head + body)
            return
        try:
            if bodiless:
                transport.write(_head(status, answer.headers, None, close))
                return
            length = answer.length
            chunked = length is None and req.keep_alive and not close
            extra = "Transfer-Encoding: chunked" if chunked else None
            if length is None and not chunked:
                close = True  # HTTP/1.0 or closing: the body ends when the connection does
                req.keep_alive = False
            transport.write(_head(status, answer.headers, length, close, extra))
            if answer.body:
                await self._send(answer.body, chunked)
            async for chunk in stream.iter_any():
                await self._send(chunk, chunked)
            if chunked and self.transport is not None:
                self.transport.write(b"0\r\n\r\n")
        except Exception as exc:
            # A gateway dying mid-body: cut the client off rather than pass off a truncated
            # body as complete.
            logger.warning("response stream from gateway cut off: %r", exc)
            self._abort()
        finally:
            stream.release()

    async def _send(self, data: bytes, chunked: bool) -> None:
        transport = self.transport
        if transport is None:
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

    def _refuse(self, refusal: _Refusal) -> None:
        """A malformed or over-limit request: answered after the requests before it, then
        the connection closes; nothing after it is read."""
        self.stop_parsing = True
        self._pause_reading()
        incoming, self.incoming = self.incoming, None
        if incoming is not None and incoming is self.current:
            # Its body broke off mid-way: the handler's read fails and it answers.
            incoming.error = MalformedBody(refusal.detail)
            incoming._wake()
            return
        if incoming is not None and incoming in self.waiting:
            self.waiting.remove(incoming)
        if self.refusal is None:
            self.refusal = refusal
        if self.current is None:
            self._send_refusal()
            if self.transport is not None:
                self.transport.close()

    def _send_refusal(self) -> None:
        refusal = self.refusal
        if refusal is None or self.transport is None:
            return
        status = refusal.status
        title = HTTPStatus(status).phrase
        answer = problem(status, title, refusal.detail)
        self.transport.write(_head(status, answer.headers, len(answer.body), True) + answer.body)
        self.server.refused += 1

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None:
            self.read_paused = True
            self.transport.pause_reading()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def idle(self) -> bool:
        return self.current is None and self.incoming is None and not self.in_head

    def sweep(self, now: float) -> None:
        """Close this connection if it idled past keep-alive; refuse a request whose head
        or body stalled past the read timeout."""
        transport = self.transport
        if transport is None:
            return
        quiet = now - self.last_read
        if self.current is None:
            if self.in_head:
                if quiet > self.server.read_timeout:
                    self._refuse(_Refusal(408, "the request head did not arrive in time"))
            elif quiet > self.server.keepalive_timeout:
                transport.close()
            return
        incoming = self.incoming
        stalled = quiet > self.server.read_timeout
        if stalled and incoming is self.current and incoming is not None and not incoming.error:
            incoming.error = BodyTimeout("the request body stalled")
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
    ) -> None:
        self.handler = handler
        self.body_cap = body_cap  # the most any route accepts, read when a body arrives
        self.keepalive_timeout = keepalive_timeout
        self.read_timeout = read_timeout
        self.conns: set[_Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # one per request being served
        self.closing = False
        self.refused = 0  # requests refused before the handler, as malformed or over limits
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
        for conn in list(self.conns):
            conn.sweep(now)
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    async def close(self, deadline: float = 60.0) -> None:
        """Stop accepting, close idle connections, give in-flight requests `deadline`
        seconds to be answered, then cut off whatever is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.idle() and conn.transport is not None:
                conn.transport.close()
        end = time.monotonic() + deadline
        while self.tasks and time.monotonic() < end:
            await asyncio.wait(set(self.tasks), timeout=end - time.monotonic())
        for conn in list(self.conns):
            conn._abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the transports finish closing their sockets


def problem(status: int, title: str, detail: str) -> Answer:
    """A problem+json answer for refusals made before any route is known."""
    body = orjson.dumps({"type": "about:blank", "title": title, "status": status, "detail": detail})
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
    extra: str | None = None,
) -> bytes:
    lines = [_status_line(status)]
    lines.extend(map(": ".join, headers.items()))
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if extra is not None:
        lines.append(extra)
    if "Date" not in headers:
        lines.append(_date_line())
    if close:
        lines.append("Connection: close")
    lines.append("\r\n")
    head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
    # One CR LF per line plus the blank line: any other CR or LF would split a header.
    if head.count(b"\n") != len(lines) or head.count(b"\r") != len(lines):
        raise ValueError("CR or LF inside a response header")
    return head
