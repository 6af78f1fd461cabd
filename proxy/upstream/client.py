"""A lean pooled HTTP/1.1 client: `UpstreamClient.send` is its one way to reach a gateway.

Owns: a pool per origin (scheme, host, port and TLS context): idle connections reused most
recent first and closed after an idle timeout or as soon as the gateway closes them; a cap
on the connections open to one origin; opening connections (TCP, then TLS with the
gateway's context built once at load time); the request bytes encoded once for one write.
Must not: retry across gateways, time the exchange beyond the `within` its caller gives, or
judge outcomes: it reports `ConnectFailed`, `LocalFailure`, `ConnectionLost`, `BadResponse`
or `Expired`, and proxy.forward decides what each means for a payment.

What can be known about a request the gateway may not have read (RFC 9112 §9.3.1):
- A pooled connection is looked at just before its reuse, without blocking: if the
  gateway's FIN or RST (or stray bytes) already arrived, the connection is never written to
  and the request goes on a fresh connection instead. This is the one case where a closing
  gateway provably did not read the request; being sure costs one non-blocking peek.
- A FIN or RST that arrives after the write is ambiguous: the gateway may have closed an
  idle connection just as the request crossed it (unread), or read it, acted and died. TCP
  does not say which (an ACK is the kernel's, not the application's), so for POST/PATCH it
  stays "may have been sent". For the idempotent methods a reused connection that ends
  with no byte of an answer is sent again, once, on a fresh connection, as aiohttp and
  RFC 9112 §9.3.1 do.
- Before a connection is up (TCP connect and TLS handshake, certificate checked) nothing
  was written: every failure there, and every local refusal, is "not sent". Under TLS 1.3
  a gateway refuses our client certificate only after our side of the handshake ended and
  the request was written; its refusal alert, before any answer byte, still proves its
  application never read it (proxy.upstream.connection). Without the alert (a bare close
  or reset) it stays ambiguous.
aiohttp's ClientSession is not used here because its generic machinery (request/response
objects, auto headers, connector bookkeeping, timers) cost more CPU per proxied request
than the rest of the request path.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import os
import socket
import ssl
from typing import Any, Final, TypeVar

from multidict import CIMultiDict
from mypy_extensions import mypyc_attr

from proxy.aio import spawn
from proxy.headers import splits_a_line
from proxy.upstream.connection import MAX_HEAD_BYTES, Connection, Convert
from proxy.upstream.phase import Progress
from proxy.upstream.response import (
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    Expired,
    LocalFailure,
    Response,
    UpstreamError,
)

__all__ = [
    "MAX_HEAD_BYTES",
    "BadResponse",
    "ConnectFailed",
    "ConnectionLost",
    "Expired",
    "LocalFailure",
    "Origin",
    "Response",
    "UpstreamClient",
    "UpstreamError",
]

logger = logging.getLogger(__name__)

Origin = tuple[str, str, int]  # scheme, host, port
PoolKey = tuple[str, str, int, ssl.SSLContext | None]
T = TypeVar("T")

#: Connections open to one origin when its gateway sets no `limits.max_connections`
#: (Envoy's default circuit-breaker threshold).
DEFAULT_MAX_CONNECTIONS: Final = 1024
#: Methods whose request carries a Content-Length even when the body is empty.
_LENGTH_REQUIRED = frozenset({"POST", "PUT", "PATCH"})
_DEFAULT_PORT = {"http": 80, "https": 443}
_FRAMING = ("host", "content-length", "transfer-encoding")
#: Errors that say payswitch, not the gateway, ran out of something.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Pool:
    """The connections to one origin: idle ones, and how many are open."""

    __slots__ = ("client", "host_line", "idle", "key", "open", "server_name", "tls")

    def __init__(self, client: UpstreamClient, key: PoolKey, server_name: str | None) -> None:
        self.client = client
        self.key = key
        self.tls = key[3]
        self.server_name = server_name or key[1]
        self.idle: dict[Connection, None] = {}  # insertion order: the last in is reused first
        self.open = 0  # connections made or being made, idle or busy
        self.host_line = _host_line(key[0], key[1], key[2])

    def take_idle(self) -> Connection | None:
        idle = self.idle
        if not idle:
            return None
        timeout = self.client.idle_timeout
        while idle:
            conn, _ = idle.popitem()  # the most recently used: the least likely to be stale
            if conn.idle_since > conn.loop.time() - timeout and not conn.gone():
                return conn
            self.forget(conn)
            conn.abort()
        return None

    def put(self, conn: Connection) -> None:
        client = self.client
        if client.closed or len(self.idle) >= client.max_idle:
            conn.abort()
            return
        self.idle[conn] = None
        if client.sweeper is None:
            client.swept_later(conn.loop)

    def forget(self, conn: Connection) -> None:
        self.idle.pop(conn, None)
        self.client.drop(conn)
        if conn.counted:
            conn.counted = False
            self.open -= 1

    def resend(
        self,
        fut: asyncio.Future[Any],
        data: bytes,
        *,
        head_only: bool,
        limit: int,
        within: float,
        convert: Convert,
        progress: Progress | None,
        first: ConnectionLost,
    ) -> None:
        """Send `data` again on a fresh connection and report through `fut`; if no fresh
        connection can be had, the first loss stands."""
        self.open += 1  # the lost connection's slot was just given back
        task = spawn(
            self.client.fresh(
                self, data, head_only, limit, within, within, convert, progress, instead=first
            ),
            name=f"resend:{self.key[1]}:{self.key[2]}",
        )

        def relay(t: asyncio.Task[Any]) -> None:
            if fut.done():
                return
            if t.cancelled():
                fut.cancel()
            else:
                fut.set_result(t.result())

        def cancel(f: asyncio.Future[Any]) -> None:
            if f.cancelled():
                task.cancel()

        task.add_done_callback(relay)
        fut.add_done_callback(cancel)


@mypyc_attr(allow_interpreted_subclasses=True)  # sinks and test fakes extend it
class UpstreamClient:
    """Pooled keep-alive connections to any number of origins."""

    def __init__(self, *, idle_timeout: float = 15.0, max_idle: int = 256) -> None:
        self.idle_timeout = idle_timeout
        self.max_idle = max_idle  # per origin
        self.closed = False
        self._pools: dict[PoolKey, Pool] = {}
        self._live: set[Connection] = set()
        self.sweeper: asyncio.TimerHandle | None = None

    def pool(
        self, origin: Origin, tls: ssl.SSLContext | None = None, server_name: str | None = None
    ) -> Pool:
        """The pool for `origin` (and, for https, the TLS context it is reached with)."""
        key = (origin[0], origin[1], origin[2], tls)
        pool = self._pools.get(key)
        if pool is None:
            pool = self._pools[key] = Pool(self, key, server_name)
        return pool

    def send(
        self,
        pool: Pool,
        data: bytes,
        *,
        within: float,
        connect_timeout: float,
        convert: Convert,
        head_only: bool = False,
        idempotent: bool = False,
        limit: int = 0,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        progress: Progress | None = None,
    ) -> asyncio.Future[Any]:
        """Send `data` (from `encode`) to the pool's origin once and report through the
        returned future `convert` of the Response (body whole up to `limit` bytes, else
        streaming) or of the UpstreamError that ended the exchange. `within` bounds the
        exchange from its first byte written; `progress` follows it (connecting → writing →
        sent → answered). On a pooled connection no task is made. An idempotent request
        on a reused connection that ends with no byte of an answer is sent once more on a
        fresh connection. Cancelling the future closes the connection."""
        conn = pool.take_idle()
        if conn is not None:
            fut: asyncio.Future[Any] = conn.loop.create_future()
            if idempotent:
                conn.resend = data
            conn.exchange(fut, data, head_only, limit, within, convert, progress)
            return fut
        loop = asyncio.get_running_loop()
        if self.closed or pool.open >= max_connections:
            done: asyncio.Future[Any] = loop.create_future()
            why = (
                LocalFailure(f"{max_connections} connections already open: the gateway's cap")
                if not self.closed
                else ConnectFailed("the upstream client is closed")
            )
            done.set_result(convert(why))
            return done
        pool.open += 1  # the slot is held while connecting
        return loop.create_task(
            self.fresh(pool, data, head_only, limit, connect_timeout, within, convert, progress),
            name=f"connect:{pool.key[1]}:{pool.key[2]}",
        )

    async def fresh(
        self,
        pool: Pool,
        data: bytes,
        head_only: bool,
        limit: int,
        connect_timeout: float,
        within: float,
        convert: Convert,
        progress: Progress | None,
        *,
        instead: UpstreamError | None = None,
    ) -> Any:
        """Open a connection (its slot already held) and make the exchange on it; if none
        can be had, the outcome is that failure, or `instead` when one is given."""
        try:
            conn = await self._open(pool, connect_timeout)
        except UpstreamError as exc:
            return convert(instead or exc)
        fut: asyncio.Future[Any] = conn.loop.create_future()
        conn.exchange(fut, data, head_only, limit, within, convert, progress)
        try:
            return await fut
        except asyncio.CancelledError:
            fut.cancel()
            raise

    def encode(
        self, pool: Pool, method: str, target: str, headers: CIMultiDict[str], body: bytes
    ) -> bytes:
        """The request as bytes for one write; ValueError for a head that would split."""
        if "Host" in headers or "Content-Length" in headers or "Transfer-Encoding" in headers:
            # Host and framing are ours: the gateway is chosen here and the body is buffered.
            headers = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _FRAMING)
        lines = [f"{method} {target} HTTP/1.1", pool.host_line]
        for k, v in headers.items():  # a third cheaper compiled than `map(": ".join, ...)`
            lines.append(f"{k}: {v}")
        if body or method in _LENGTH_REQUIRED:
            lines.append(f"Content-Length: {len(body)}")
        if splits_a_line(lines):
            raise ValueError("CR or LF inside the request line or a header")
        lines.append("\r\n")
        head = "\r\n".join(lines).encode("utf-8", "surrogateescape")
        return head + body if body else head

    def idle_count(self, origin: Origin, tls: ssl.SSLContext | None = None) -> int:
        pool = self._pools.get((origin[0], origin[1], origin[2], tls))
        return len(pool.idle) if pool is not None else 0

    def open_count(self, origin: Origin, tls: ssl.SSLContext | None = None) -> int:
        pool = self._pools.get((origin[0], origin[1], origin[2], tls))
        return pool.open if pool is not None else 0

    async def close(self) -> None:
        self.closed = True
        if self.sweeper is not None:
            self.sweeper.cancel()
        for conn in list(self._live):
            conn.abort()
        for pool in self._pools.values():
            pool.idle.clear()
        await asyncio.sleep(0)  # let the transports finish closing their sockets

    def swept_later(self, loop: asyncio.AbstractEventLoop) -> None:
        if self.sweeper is None:
            self.sweeper = loop.call_later(self.idle_timeout, self._sweep)

    async def _open(self, pool: Pool, connect_timeout: float) -> Connection:
        """A new connection, TLS included; raises ConnectFailed or LocalFailure. Releases
        the pool slot held for it unless it is made."""
        _, host, port, tls = pool.key
        loop = asyncio.get_running_loop()
        made: list[Connection] = []
        try:
            async with asyncio.timeout(connect_timeout):
                sock = await _connected_socket(loop, host, port)
                try:
                    await loop.create_connection(
                        lambda: _made(made, pool, sock),
                        sock=sock,
                        ssl=tls,
                        server_hostname=pool.server_name if tls is not None else None,
                    )
                except BaseException:
                    sock.close()
                    raise
        except BaseException as exc:
            for conn in made:  # made, but a TLS handshake that failed never reports it lost
                conn.abort()
                pool.forget(conn)
            if not made:
                pool.open -= 1
            if isinstance(exc, TimeoutError):
                raise ConnectFailed(f"connect to {host}:{port} timed out") from None
            if _local(exc):
                raise LocalFailure(f"payswitch cannot open a connection: {exc}") from None
            if isinstance(exc, OSError):  # refused, unreachable, DNS, TLS handshake
                raise ConnectFailed(f"connect to {host}:{port} failed: {exc}") from None
            raise
        conn = made[0]
        if self.closed:
            conn.abort()
            raise ConnectFailed("the upstream client is closed")
        self._live.add(conn)
        return conn

    def drop(self, conn: Connection) -> None:
        self._live.discard(conn)

    def _sweep(self) -> None:
        """Close connections idle past the timeout, so a quiet gateway holds no sockets."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - self.idle_timeout
        pending = False
        for key, pool in list(self._pools.items()):
            for conn in [c for c in pool.idle if c.idle_since <= cutoff]:
                pool.forget(conn)
                conn.abort()
            pending = pending or bool(pool.idle)
            if not pool.open:  # e.g. the context of a rotated certificate: nothing uses it
                del self._pools[key]
        self.sweeper = loop.call_later(self.idle_timeout / 2, self._sweep) if pending else None


def _made(made: list[Connection], pool: Pool, sock: socket.socket) -> Connection:
    made.append(Connection(pool, sock))
    return made[-1]


async def _connected_socket(loop: asyncio.AbstractEventLoop, host: str, port: int) -> socket.socket:
    """A TCP socket connected to host:port; ours, so a close can be seen before a reuse."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        addresses: list[tuple[int, Any]] = [(info[0], info[4]) for info in infos]
    else:
        addresses = [(socket.AF_INET6 if ip.version == 6 else socket.AF_INET, (host, port))]
    error: OSError = OSError(f"no address for {host}")
    for family, address in addresses:
        sock = socket.socket(family, socket.SOCK_STREAM)  # EMFILE shows up here
        try:
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one write, sent now
            await _sock_connect(loop, sock, address)
        except OSError as exc:
            sock.close()
            if _local(exc):
                raise
            error = exc
            continue
        except BaseException:
            sock.close()
            raise
        return sock
    raise error


async def _sock_connect(loop: asyncio.AbstractEventLoop, sock: socket.socket, address: Any) -> None:
    """Connect a non-blocking socket to an address already resolved. loop.sock_connect would
    do the same, but uvloop's resolves the address again first, and for a socket it is given
    that goes through libuv's resolver threads even for a literal IP: one thread-pool round
    trip per new upstream connection."""
    try:
        sock.connect(address)
        return  # loopback can connect at once
    except (BlockingIOError, InterruptedError):
        pass
    fd = sock.fileno()
    writable = loop.create_future()
    loop.add_writer(fd, _settle, writable)
    try:
        await writable  # a timeout or a cancel lands here; the caller closes the socket
    finally:
        loop.remove_writer(fd)
    error = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    if error:
        raise OSError(error, os.strerror(error))  # e.g. ConnectionRefusedError, as connect() raises


def _settle(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _local(exc: BaseException) -> bool:
    return (
        isinstance(exc, OSError) and not isinstance(exc, ssl.SSLError) and exc.errno in LOCAL_ERRNOS
    )


def _host_line(scheme: str, host: str, port: int) -> str:
    if ":" in host:
        host = f"[{host}]"
    return f"Host: {host}" if _DEFAULT_PORT.get(scheme) == port else f"Host: {host}:{port}"
