"""The latest events, kept in memory and streamed live to the dashboard.

Owns: `TailSink`, an event sink that keeps the last events in a ring and hands each new
one to every subscriber's bounded queue (a subscriber that does not keep up loses events,
counted, never slowing the producer); and `stream`, the server-sent-events answer of
`GET /admin/events?severity=...`.
Must not: block or raise into `offer` (it is on the request path: two events per payment),
nor keep an SSE answer open once the process is shutting down or its client has left.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable

from proxy.adminhttp import AdminRequest, text_response
from proxy.aio import within
from proxy.events import Event, Severity, encode
from proxy.http import Answer

logger = logging.getLogger(__name__)

RECENT = 200  # events replayed to a new subscriber, per ring
QUEUE = 1000  # events a subscriber may fall behind by before losing some
HEARTBEAT = 1.0  # seconds between checks for shutdown, with a comment line every 15
_WARNING = Severity.WARNING  # a module global: `offer` runs twice per payment


class TailSink:
    name = "tail"

    def __init__(self, *, min_severity: Severity = Severity.INFO) -> None:
        self.min_severity = min_severity
        self._recent: deque[Event] = deque(maxlen=RECENT)
        # Warnings and worse in a ring of their own, so a burst of routine events (two per
        # payment) cannot push an ejection out of what a newly opened page sees.
        self._notable: deque[Event] = deque(maxlen=RECENT)
        self._subscribers: dict[asyncio.Queue[Event | None], Severity] = {}
        self._dropped = 0
        self._closed = False

    @property
    def dropped(self) -> int:
        return self._dropped

    def offer(self, event: Event) -> bool:
        if event.severity >= _WARNING:
            self._notable.append(event)
        else:
            self._recent.append(event)
        if not self._subscribers:
            return True
        for queue, min_severity in self._subscribers.items():
            if event.severity < min_severity:
                continue
            if queue.full():
                self._dropped += 1
            else:
                queue.put_nowait(event)
        return True

    def subscribe(self, min_severity: Severity) -> tuple[list[Event], asyncio.Queue[Event | None]]:
        """The recent events at or above `min_severity`, and a queue of the next ones
        (None once the sink closes)."""
        queue: asyncio.Queue[Event | None] = asyncio.Queue(QUEUE)
        if self._closed:
            queue.put_nowait(None)
        self._subscribers[queue] = min_severity
        backlog = [e for e in (*self._recent, *self._notable) if e.severity >= min_severity]
        backlog.sort(key=lambda e: e.ts)
        return backlog, queue

    def unsubscribe(self, queue: asyncio.Queue[Event | None]) -> None:
        self._subscribers.pop(queue, None)

    async def start(self) -> None:
        return None

    async def close(self, grace: float) -> None:
        self._closed = True
        for queue in self._subscribers:
            with contextlib.suppress(asyncio.QueueFull):
                queue.put_nowait(None)


def _frame(event: Event) -> bytes:
    return b"id: " + event.id.encode() + b"\ndata: " + encode(event) + b"\n\n"


_SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class EventStream:
    """The body of one SSE answer: the backlog, then live events as they come, until the
    client leaves, the tail closes or the process stops. `release` unsubscribes."""

    def __init__(
        self,
        tail: TailSink,
        backlog: list[Event],
        queue: asyncio.Queue[Event | None],
        stopping: Callable[[], bool],
        client_left: Callable[[], bool],
    ) -> None:
        self._tail = tail
        self._backlog = backlog
        self._queue = queue
        self._stopping = stopping
        self._client_left = client_left

    async def iter_any(self) -> AsyncIterator[bytes]:
        queue = self._queue
        yield b"retry: 2000\n\n" + b"".join(map(_frame, self._backlog))
        self._backlog = []
        idle = 0.0
        while not self._stopping() and not self._client_left():
            try:
                first = await within(queue.get(), HEARTBEAT)
            except TimeoutError:
                idle += HEARTBEAT
                if idle >= 15:
                    idle = 0.0
                    yield b": keep-alive\n\n"
                continue
            idle = 0.0
            batch = [first]
            while not queue.empty():
                batch.append(queue.get_nowait())
            events = [e for e in batch if e is not None]
            if events:
                yield b"".join(map(_frame, events))
            if len(events) != len(batch):
                return  # the tail closed

    def release(self) -> None:
        self._tail.unsubscribe(self._queue)


def stream(request: AdminRequest, tail: TailSink, stopping: Callable[[], bool]) -> Answer:
    """`text/event-stream` of events at or above `?severity=` (default info)."""
    raw = request.query.get("severity", "info").upper()
    if raw not in Severity.__members__:
        names = ", ".join(s.name.lower() for s in Severity)
        return text_response(f"severity must be one of {names}", status=400)
    backlog, queue = tail.subscribe(Severity[raw])
    body = EventStream(tail, backlog, queue, stopping, lambda: request.client_left)
    return Answer(200, _SSE_HEADERS, stream=body)
