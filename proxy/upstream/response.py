"""What one exchange with a gateway gives back: the answer, or how it failed.

Owns: `Response` (status and headers at once, the body as it arrives, the connection handed
back or closed on release) and the `UpstreamError` family that says how far a failed
exchange got.
Must not: parse HTTP or touch sockets (proxy.upstream.connection does).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

if TYPE_CHECKING:
    from proxy.upstream.connection import Connection


class UpstreamError(Exception):
    """The exchange failed; the subclass says how far it got."""


class ConnectFailed(UpstreamError):
    """No connection was made, so no byte of the request was written."""


class LocalFailure(UpstreamError):
    """payswitch itself could not open a connection (out of descriptors or buffers, or the
    gateway's connection cap reached): nothing was written and the gateway is not to blame."""


class ConnectionLost(UpstreamError):
    """The connection ended before the response was complete."""


class BadResponse(UpstreamError):
    """The gateway's answer is not HTTP/1.1 we accept."""


class Expired(UpstreamError):
    """The exchange outlived the time its caller gave it; the connection was closed."""


class Response:
    """A gateway's answer: status and headers now, the body as it arrives.

    Offers what the handler's streaming code reads (`content.iter_any()`, `content_length`,
    `release()`). Release it always: a complete response returns its connection to the pool,
    anything else closes it.
    """

    __slots__ = ("_conn", "body", "content_length", "headers", "status", "streaming")

    def __init__(self, conn: Connection) -> None:
        self._conn: Connection | None = conn
        self.body = b""  # the whole body, or what came before streaming
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

    def iter_any(self) -> AsyncIterator[bytes]:
        conn = self._conn
        assert conn is not None
        return _Chunks(conn)

    def release(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.finish()

    def __del__(self) -> None:
        # Never released (an abandoned attempt's answer): the connection cannot be reused.
        if self._conn is not None and not self._conn.loop.is_closed():
            self._conn.abort()


class _Chunks:
    """The body's chunks as they arrive, joined per wake-up. A class rather than an async
    generator, which the native build cannot compile."""

    __slots__ = ("_conn",)

    def __init__(self, conn: Connection) -> None:
        self._conn = conn

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        conn = self._conn
        await conn.until(bool(conn.chunks) or conn.done)
        if not conn.chunks:
            raise StopAsyncIteration
        return b"".join(conn.take())
