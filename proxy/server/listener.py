"""The traffic listener: accepting connections, the sweep, draining and closing.

Owns: the listening socket, the set of open connections and of requests being served,
admission against the connection cap, the once-a-second deadline sweep, and the shutdown
sequence: `drain` (answers say Connection: close, idle connections close between
requests) then `close` (stop accepting, let what has begun finish, cut off the rest).
Must not: parse or answer requests (the connection and its cycle do).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import time
from collections.abc import Callable
from typing import cast

import orjson

from proxy.http import Handler, problem_fields
from proxy.server import deadlines, wire
from proxy.server.admission import ConnectionCap
from proxy.server.connection import Connection, Phase
from proxy.server.limits import (
    DRAIN_IDLE,
    KEEPALIVE_TIMEOUT,
    READ_TIMEOUT,
    SWEEP_INTERVAL,
    WRITE_TIMEOUT,
)

logger = logging.getLogger("proxy.server")

_OVER_CAP_BODY = orjson.dumps(
    problem_fields(
        503,
        "Service Unavailable",
        "payswitch is at its cap of client connections; retry on a new connection",
        "max-connections",
    )
)
_OVER_CAP = {"Content-Type": "application/problem+json", "Retry-After": "1"}


class ProxyServer:
    """The traffic listener: `start`, `drain` for the grace period, then `close`."""

    def __init__(
        self,
        handler: Handler,
        body_cap: Callable[[], int],
        cap: ConnectionCap | None = None,
        /,
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
        self.cap = cap or ConnectionCap()
        self.conns: set[Connection] = set()
        self.tasks: set[asyncio.Task[None]] = set()  # one per request being served
        self.draining = False  # the grace period: answers say Connection: close
        self.closing = False  # not accepting; what has not started is not started
        self.refused = 0  # requests refused before the handler, as malformed or over limits
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self.loop: asyncio.AbstractEventLoop = cast(asyncio.AbstractEventLoop, None)

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def winding_down(self) -> bool:
        """Draining or closing: no connection is kept alive past its current answer."""
        return self.draining or self.closing

    async def start(
        self, host: str, port: int, *, backlog: int = 1024, reuse_port: bool = False
    ) -> None:
        """Listen on host:port. `reuse_port` (SO_REUSEPORT) lets several worker processes
        each hold a socket on the same port, the kernel spreading new connections among
        them; a port already held without it is refused (EADDRINUSE)."""
        self.loop = asyncio.get_running_loop()
        sock = listening_socket(host, port, backlog=backlog, reuse_port=reuse_port)
        if sock is not None:
            self._server = await self.loop.create_server(lambda: Connection(self), sock=sock)
        else:  # a host name: the loop resolves it, and listens on every address it has
            self._server = await self.loop.create_server(
                lambda: Connection(self),
                host,
                port,
                backlog=backlog,
                reuse_address=True,
                reuse_port=reuse_port or None,
            )
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)

    # -- what connections report ---------------------------------------------------------------

    def connected(self, conn: Connection) -> None:
        if not self.cap.admit():
            self._refuse_connection(conn)
            return
        conn.admitted = True
        self.conns.add(conn)

    def disconnected(self, conn: Connection) -> None:
        self.conns.discard(conn)
        if conn.admitted:
            conn.admitted = False
            self.cap.release()

    def track(self, task: asyncio.Task[None]) -> None:
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def count_refusal(self, reason: str) -> None:
        self.refused += 1
        self.cap.refused(reason)

    def _refuse_connection(self, conn: Connection) -> None:
        """Over the cap: a 503 saying so, then the connection closes; nothing is read."""
        transport = conn.transport
        if transport is None:
            return
        conn.stop_reading()
        head = wire.head(503, _OVER_CAP, len(_OVER_CAP_BODY), True, False)
        transport.write(head + _OVER_CAP_BODY)
        conn.close()

    # -- deadlines and shutdown ----------------------------------------------------------------

    def _sweep(self) -> None:
        now = self.loop.time()
        self._sweeper = self.loop.call_later(SWEEP_INTERVAL, self._sweep)
        for conn in list(self.conns):
            try:
                deadlines.sweep(conn, now)
            except Exception:
                logger.exception("connection sweep failed; closing that connection")
                conn.abort()

    def drain(self) -> None:
        """The grace period begins: every answer from now says Connection: close, and
        the sweep closes connections idle between requests for DRAIN_IDLE; a request
        whose head has begun arriving, or whose bytes are waiting to be read, is served.

        An active keep-alive client is told to close by its next answer rather than
        closed while idle, because a close can cross a request already on its way."""
        self.draining = True

    def _close_idle(self) -> None:
        """Close the connections between requests. A lingering close reads out its own
        deadline (the sweep ends it); a connection just made gets DRAIN_IDLE to send its
        first request, which it made the connection for."""
        now = self.loop.time()
        for conn in list(self.conns):
            if (
                conn.phase.value < Phase.LINGERING.value
                and conn.idle()
                and (conn.started or now - conn.idle_since > DRAIN_IDLE)
                and not conn.pending()
            ):
                conn.close()

    async def close(self, deadline: float = 60.0) -> None:
        """Stop accepting, close idle connections, give requests that have begun arriving
        `deadline` seconds to be answered and their answers to go out, then cut off what
        is left."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            self._close_idle()
            if not self.conns:
                break
            if self.tasks:
                await asyncio.wait(set(self.tasks), timeout=max(0.0, end - time.monotonic()))
            else:
                await asyncio.sleep(min(0.02, max(0.0, end - time.monotonic())))
        for conn in list(self.conns):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        if self._server is not None:
            await self._server.wait_closed()
        await asyncio.sleep(0)  # let the transports finish closing their sockets


def listening_socket(
    host: str, port: int, *, backlog: int, reuse_port: bool
) -> socket.socket | None:
    """A listening socket on an IP address, bound here; None for anything else (a host name,
    or "" for every interface), which the loop's create_server resolves. Given a host
    string, uvloop resolves even a literal address on libuv's thread pool, which starts four
    threads that then stay for the process's life; a sidecar listening on 0.0.0.0 and
    127.0.0.1 needs none of them. Options as create_server's: SO_REUSEADDR, SO_REUSEPORT
    when asked, IPv6 sockets IPv6-only; a failed bind says so as create_server does."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return None
    family = socket.AF_INET6 if ip.version == 6 else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            reason = (exc.strerror or str(exc)).lower()
            raise OSError(
                exc.errno, f"error while attempting to bind on address {(host, port)!r}: {reason}"
            ) from None
        sock.listen(backlog)
        sock.setblocking(False)
    except BaseException:
        sock.close()
        raise
    return sock
