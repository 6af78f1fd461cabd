"""One client connection: bytes in, requests queued in order, one served at a time.

Owns: the connection's phase (reading, stopped, lingering, closing, aborted, closed), the
queue of parsed requests waiting their turn, feeding bytes to the parser under the
pipelining limits, refusing a request that broke a limit, and closing (gracefully, with a
lingering close, or with a reset).
Must not: build heads (head.py), write answers (cycle.py) or enforce deadlines
(deadlines.py); and never cancel a handler whose client went away: a payment already
sent must run to its end and be recorded.
"""

from __future__ import annotations

import asyncio
import enum
from collections import deque
from http import HTTPStatus
from typing import TYPE_CHECKING, cast

from httptools import HttpParserError, HttpParserUpgrade

from proxy.http import ClientClosed, MalformedBody, Request, problem
from proxy.server import cycle, sockets, wire
from proxy.server.head import HeadReader
from proxy.server.limits import (
    LINGER,
    MAX_HEAD_BYTES,
    MAX_PIPELINED,
    MAX_QUEUED_BODY,
    MAX_WAITING,
    SLICE,
    Refusal,
)

if TYPE_CHECKING:
    from proxy.server.listener import ProxyServer


class Phase(enum.Enum):
    """Where the connection is in its life; each phase only moves forward."""

    READING = 1  # bytes are parsed as requests
    STOPPED = 2  # nothing more is parsed (a refusal, an upgrade, EOF, a body over the cap)
    LINGERING = 3  # our side is shut; what the client still sends is read and dropped
    CLOSING = 4  # closed once what is written has gone out
    ABORTED = 5  # reset; nothing more is served
    CLOSED = 6  # the transport is gone


class Connection(asyncio.Protocol):
    """Requests parsed in order, answered one at a time.

    Reading stays on while the current request's body is arriving; it pauses while parsed
    requests wait their turn beyond MAX_PIPELINED or MAX_QUEUED_BODY bytes, and while the
    client is not reading its answers (the next request is not started until it does).
    """

    def __init__(self, server: ProxyServer) -> None:
        self.server = server
        self.loop = server.loop
        self.transport: asyncio.Transport | None = None
        self.remote: str | None = None
        self.phase = Phase.READING
        #: `phase is Phase.READING` / `phase is Phase.ABORTED`, kept beside it by `_enter`:
        #: read several times per request, where a property costs a call each time.
        self.reading = True
        self.aborted = False
        self.phase_since = self.loop.time()  # when it entered the phase
        self.linger_until = 0.0
        self.head = HeadReader(self)
        self.incoming: Request | None = None  # the request whose body is arriving
        self.waiting: deque[Request] = deque()  # parsed, not yet handed to the handler
        self.backlog = b""  # received, not yet parsed: the pipelining limits were reached
        self.current: Request | None = None  # with the handler now
        self.refusal: Refusal | None = None  # answered once the current request is done
        self.last_answer = False  # the answer being written says Connection: close
        self.held = False  # the next request waits until the client reads its answers
        self.read_paused = False
        self.write_paused = False
        self.write_paused_at = 0.0
        self.drain: asyncio.Future[None] | None = None
        self.eof = False  # the client half-closed
        self.idle_since = self.phase_since
        self.started = 0  # requests handed to the handler on this connection
        self.admitted = False  # counted against the connection cap

    # -- phase ---------------------------------------------------------------------------------

    @property
    def open(self) -> bool:
        return self.transport is not None

    def _enter(self, phase: Phase) -> None:
        if phase.value > self.phase.value:
            self.phase = phase
            self.reading = False  # READING is the first phase: it is never entered again
            self.aborted = phase is Phase.ABORTED
            self.phase_since = self.loop.time()

    def stop_reading(self) -> None:
        """Nothing more on this connection is parsed as requests."""
        self._enter(Phase.STOPPED)

    # -- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        self.remote = peer[0] if isinstance(peer, tuple) and peer else None
        self.server.connected(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._enter(Phase.CLOSED)
        self.server.disconnected(self)
        self.waiting.clear()
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.wake()  # its `read` sees the connection gone
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    def eof_received(self) -> bool:
        """The client half-closed: answer what was received whole, then close."""
        if self.backlog and self.reading:
            data, self.backlog = self.backlog, b""
            self._parse(data)  # at most one read more than the limits: parsed now
        self.eof = True
        self.stop_reading()
        incoming, self.incoming = self.incoming, None
        if incoming is not None:
            incoming.error = ClientClosed("the client closed the connection mid-body")
            incoming.wake()
            if incoming in self.waiting:
                self.waiting.remove(incoming)
        # Keep the write side open for the answers still owed; else close now.
        owed = self.current is not None or bool(self.waiting)
        return owed and self.phase is not Phase.LINGERING

    def pause_writing(self) -> None:
        self.write_paused = True
        self.write_paused_at = self.loop.time()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)
        if self.held:
            self.held = False
            self.next()

    def data_received(self, data: bytes) -> None:
        if not self.reading:
            return  # after a refusal or an upgrade: read and dropped (lingering close)
        if self.backlog:
            self.backlog += data  # a read that raced the pause
            return
        self._feed(data)

    def send_continue(self) -> None:
        if self.transport is not None:
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    # -- intake --------------------------------------------------------------------------------

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
            if not self.reading:
                return
            if start and not self.room():
                self.backlog = bytes(view[start:])
                self.update_reading()
                return
            step = SLICE
            incoming = self.incoming
            if incoming is not None and incoming.content_length is not None:
                step = max(SLICE, incoming.content_length - incoming.size)
            self._parse(view[start : start + step])
            start += step

    def room(self) -> bool:
        """May more requests be parsed while earlier ones wait their turn?"""
        waiting = self.waiting
        return (
            len(waiting) < MAX_PIPELINED
            and sum(r.size for r in waiting if not r.over_cap) <= MAX_QUEUED_BODY
        )

    def _parse(self, data: bytes | memoryview) -> None:
        head = self.head
        head.unparsed += len(data)
        try:
            head.parser.feed_data(data)
        except HttpParserUpgrade:
            # The bodiless request before the new protocol was parsed (one with a body is
            # refused as its head completes); it is answered over HTTP/1.1, then the
            # connection closes: no protocol switch is offered.
            self.stop_reading()
            self.update_reading()
        except Refusal as refusal:
            self.refuse(refusal)
        except HttpParserError as malformed:
            cause = malformed.__context__
            if isinstance(cause, Refusal):
                self.refuse(cause)
            else:
                self.refuse(Refusal(400, f"malformed HTTP request: {malformed}"))
        else:
            # httptools gathers a header line (or a trailer) across reads before calling
            # back: bound what it can hold without completing anything.
            if head.unparsed > MAX_HEAD_BYTES:
                self.refuse(Refusal(431, f"request head exceeds {MAX_HEAD_BYTES} bytes"))

    def head_arrived(self, req: Request) -> None:
        self.incoming = req
        if self.current is None and not self.held:
            self.start(req)
        elif len(self.waiting) >= MAX_WAITING:
            raise Refusal(503, f"more than {MAX_WAITING} pipelined requests waiting")
        else:
            self.waiting.append(req)
            self.update_reading()

    def body_arrived(self, body: bytes) -> None:
        req = self.incoming
        if req is None or req.over_cap:
            return
        req.size += len(body)
        if req.size > self.server.body_cap():
            # Nothing more is kept; the handler refuses it and the connection closes.
            req.over_cap = True
            req.body = b""
            self.stop_reading()
            self.update_reading()
        else:
            req.add(body)
            if req is not self.current:
                self.update_reading()  # a waiting request's body counts against the queue
        req.wake()

    def request_complete(self) -> None:
        req = self.incoming
        if req is not None:
            req.complete = True
            self.incoming = None
            req.wake()

    # -- serving, in order ---------------------------------------------------------------------

    def start(self, req: Request) -> None:
        self.current = req
        self.started += 1
        req.since = self.loop.time()  # the body deadline runs from here, not while queued
        # The Task made directly, named: `loop.create_task` formats a "Task-N" name and
        # looks for a task factory first, a third of the cost of a task (none is set here).
        self.server.track(asyncio.Task(cycle.serve(self, req), loop=self.loop, name="request"))

    def finished(self, req: Request) -> None:
        req.detach()
        self.current = None
        self.idle_since = self.loop.time()
        if self.transport is None or self.aborted:
            return
        if self.last_answer or not cycle.keep(self, req):
            self.close(lingering=True)
        elif self.write_paused:
            self.held = True  # resume_writing goes on
        else:
            self.next()

    def next(self) -> None:
        """Serve the next waiting request, or read on; close if nothing more can come."""
        transport = self.transport
        if transport is None or self.aborted or self.current is not None:
            return
        if self.phase is Phase.CLOSING or transport.is_closing():
            return
        if self.held or self.write_paused:
            self.held = True  # resume_writing goes on
            return
        if self.waiting and self.server.closing:
            self.close()  # draining: what has not started is not started now
        elif self.waiting:
            self.start(self.waiting.popleft())
            if self.backlog and self.room() and self.reading:
                data, self.backlog = self.backlog, b""
                self._feed(data)
        elif self.refusal is not None:
            self._send_refusal()
            self.close(lingering=True)
        elif not self.reading:
            self.close()
        self.update_reading()

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or self.aborted:
            return
        wanted = self.reading and not self.backlog and (not self.waiting or self.room())
        if self.phase is Phase.LINGERING:
            wanted = True  # draining what the client still sends, to let it read our answer
        if wanted and self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        elif not wanted and not self.read_paused:
            self.read_paused = True
            transport.pause_reading()

    # -- refusing and closing ------------------------------------------------------------------

    def refuse(self, refusal: Refusal) -> None:
        """A malformed or over-limit request: answered after the requests before it, then
        the connection closes; nothing after it is parsed."""
        self.stop_reading()
        self.head.in_head = False
        incoming, self.incoming = self.incoming, None
        if incoming is not None and incoming is self.current:
            # Its body broke off mid-way: the handler's read fails and it answers.
            incoming.error = MalformedBody(refusal.detail)
            incoming.wake()
            self.update_reading()
            return
        if incoming is not None and incoming in self.waiting:
            self.waiting.remove(incoming)
        if self.refusal is None:
            self.refusal = refusal
        if self.current is None:
            self.next()
        else:
            self.update_reading()

    def _send_refusal(self) -> None:
        refusal, self.refusal = self.refusal, None
        if refusal is None or self.transport is None:
            return
        status = refusal.status
        title = HTTPStatus(status).phrase
        answer = problem(status, title, refusal.detail, title.lower().replace(" ", "-"))
        self.transport.write(
            wire.head(status, answer.headers, len(answer.body), True, False) + answer.body
        )
        self.server.count_refusal(refusal.reason)

    def close(self, *, lingering: bool = False) -> None:
        """Close after what is written has gone out. Lingering: first stop sending, then
        read and drop what the client still sends for a moment, so it can read our answer
        instead of a reset for the bytes it had in flight."""
        transport = self.transport
        if transport is None or self.phase.value >= Phase.CLOSING.value:
            return
        self.stop_reading()
        if lingering and self.phase is Phase.LINGERING:
            return  # already shut, and reading out its deadline
        if lingering and not self.eof and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # the client is already gone (a reset we have not read yet)
                pass
            else:
                self._enter(Phase.LINGERING)
                self.linger_until = self.phase_since + LINGER
                self.update_reading()
                return
        self._enter(Phase.CLOSING)
        transport.close()

    def abort(self) -> None:
        """Cut the connection with a reset; nothing more is served on it."""
        self._enter(Phase.ABORTED)
        self.waiting.clear()
        if self.transport is not None:
            sockets.reset(self.transport)

    def pending(self) -> bool:
        """Has the client sent bytes the loop has not read yet? Asked before closing an
        idle connection while draining, so a request already on its way is served."""
        return self.transport is not None and sockets.has_unread(self.transport)

    def idle(self) -> bool:
        """Between requests, with nothing waiting: safe to close."""
        return (
            self.current is None
            and self.incoming is None
            and not self.head.in_head
            and not self.waiting
            and not self.backlog
        )
