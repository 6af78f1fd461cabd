"""The request and answer types the listener hands the proxy, and the proxy hands back.

Owns: `Request` (the head, and the body as `read` collects it), `Answer` (status, headers,
a body whole or streamed), the body errors `read` raises, and the problem+json shape of
refusals made before any route is known.
Must not: parse HTTP or touch sockets: a request reaches its connection only through the
narrow `Channel` the listener implements, so the proxy never imports the listener.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Protocol
from urllib.parse import unquote

import orjson
from multidict import CIMultiDictProxy


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


class Channel(Protocol):
    """What a request needs of the connection it arrived on while its body arrives."""

    loop: asyncio.AbstractEventLoop
    remote: str | None
    eof: bool  # the client half-closed

    @property
    def open(self) -> bool:
        """False once the client is gone or the connection was cut."""
        ...

    def send_continue(self) -> None:
        """Tell the client to send the body it announced with `Expect: 100-continue`."""
        ...


class Answer:
    """What the handler sends back: status, end-to-end headers and the body.

    `stream`, when set, yields the body after `body`; `length` is then the whole body's
    length if known (Content-Length framing), else the body is chunked. `then`, when set,
    is the request's bookkeeping: the server runs it once the answer is written (or could
    not be), so accounting never delays what the client is waiting for.
    """

    __slots__ = ("body", "headers", "length", "status", "stream", "then")

    def __init__(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes = b"",
        *,
        stream: Stream | None = None,
        length: int | None = None,
        then: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.status = status
        self.headers = headers
        self.body = body
        self.stream = stream
        self.length = length
        self.then = then


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
        conn: Channel,
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        content_length: int | None,
        keep_alive: bool,
        http11: bool,
    ) -> None:
        self._conn: Channel | None = conn
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
            if conn is None or not conn.open:
                raise ClientClosed("the client closed the connection mid-body")
            if self.expect_continue:
                self.expect_continue = False
                conn.send_continue()
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

    def add(self, piece: bytes) -> None:
        """Append a piece of the body as it arrives."""
        body = self.body
        if not body:
            self.body = piece
        elif isinstance(body, bytearray):
            body += piece
        else:
            self.body = bytearray(body)
            self.body += piece

    def wake(self) -> None:
        """Let a pending `read` look again: more body, the end, or an error."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def client_left(self) -> bool:
        """The client closed (or half-closed: it sends nothing more) the connection, or the
        request was answered. For answers that stream until the client goes away."""
        conn = self._conn
        return conn is None or not conn.open or conn.eof

    def detach(self) -> None:
        """The request is answered: it no longer reaches its connection."""
        self._conn = None


PROBLEM_TYPES = "https://payswitch.dev/problems/"


def problem_fields(status: int, title: str, detail: str, slug: str) -> dict[str, object]:
    """The RFC 9457 members every payswitch problem body starts with."""
    return {"type": PROBLEM_TYPES + slug, "title": title, "status": status, "detail": detail}


def problem(status: int, title: str, detail: str, slug: str) -> Answer:
    """A problem+json answer for refusals made before any route is known."""
    body = orjson.dumps(problem_fields(status, title, detail, slug))
    return Answer(status, {"Content-Type": "application/problem+json"}, body)
