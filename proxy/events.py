"""Typed events with a stable JSON shape (schemas/event.schema.json).

Owns: the `Emitter` protocol every producer depends on, `Event`, `EventBus`, the
queued-sink machinery and `StreamSink` (JSON lines on stdout or a file); `Severity` and the
`KINDS` table live in proxy.event_kinds and are re-exported here.
Must not: block request handling or raise into a producer; a slow or failing sink drops and
counts, never waits. Delivery happens in background tasks started by `EventBus.start`,
or, for a `StreamSink` writing through a `LineWriter`, in batches it hands to the writer.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import IO, NamedTuple, Protocol

import orjson
from mypy_extensions import mypyc_attr
from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from proxy.aio import cancel_and_wait, spawn
from proxy.clock import SYSTEM_CLOCK, Clock, MonotonicClock, iso_millis
from proxy.event_kinds import KINDS, KindSpec, Severity, problems
from proxy.ids import new_id
from proxy.logs import LineWriter, stdout_writer

__all__ = [
    "KINDS",
    "Emitter",
    "Event",
    "EventBus",
    "KindSpec",
    "NullEmitter",
    "QueuedSink",
    "Severity",
    "Sink",
    "StreamSink",
    "encode",
    "make_event",
    "problems",
]

logger = logging.getLogger(__name__)


class Emitter(Protocol):
    def emit(self, kind: str, severity: Severity, /, **fields: object) -> None:
        """Record an event; never raises, never blocks.

        Field values must be JSON-like (str, numbers, bool, None, lists, dicts) and must not
        be mutated afterwards: they are serialised later, off the caller's path.
        """
        ...


class NullEmitter:
    __slots__ = ()

    def emit(self, kind: str, severity: Severity, /, **fields: object) -> None:
        return None


_SEVERITY_NAMES = {s: s.name.lower() for s in Severity}


class Event(NamedTuple):
    """One event. A named tuple rather than a frozen dataclass: as immutable, and cheaper
    to build on the request path, which emits two per payment."""

    kind: str
    severity: Severity
    ts: float  # unix seconds; written out as `time` only
    id: str  # unique per event; lets a receiver dedupe a retried delivery
    fields: Mapping[str, object]

    @property
    def time(self) -> str:
        """RFC 3339 UTC with milliseconds, the form every log line uses; formatted only
        when written out."""
        return iso_millis(self.ts)

    def as_dict(self) -> dict[str, object]:
        return {
            "kind": self.kind,
            "severity": _SEVERITY_NAMES[self.severity],
            "time": self.time,
            "id": self.id,
            "fields": self.fields,
        }


def make_event(kind: str, severity: Severity, wall: float, fields: Mapping[str, object]) -> Event:
    # `tuple.__new__`, not `Event(...)`: a named tuple's `__new__` is a generated lambda
    # that runs interpreted even in the native build, twice per payment.
    return tuple.__new__(Event, (kind, severity, wall, new_id(), fields))


def _fallback(value: object) -> object:
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    as_dict = getattr(value, "as_dict", None)
    if callable(as_dict):
        return as_dict()
    return str(value)


_LINE = orjson.OPT_APPEND_NEWLINE
#: Non-string keys (rare: an int-keyed map in a field) cost every event about half as much
#: again when allowed up front, so they are allowed only on a second try.
_ODD_KEYS = orjson.OPT_NON_STR_KEYS


def encode(event: Event) -> bytes:
    """The event as one line of JSON (no trailing newline)."""
    data = event.as_dict()
    try:
        return orjson.dumps(data, default=_fallback)
    except orjson.JSONEncodeError:
        return orjson.dumps(data, default=_fallback, option=_ODD_KEYS)


def encode_line(event: Event) -> bytes:
    """The event as one line of JSON, newline included: `encode` plus a newline, built
    without the property and method calls (twice per payment, in the sink's batch)."""
    kind, severity, ts, event_id, fields = event
    data = {
        "kind": kind,
        "severity": _SEVERITY_NAMES[severity],
        "time": iso_millis(ts),
        "id": event_id,
        "fields": fields,
    }
    try:
        return orjson.dumps(data, default=_fallback, option=_LINE)
    except orjson.JSONEncodeError:
        return orjson.dumps(data, default=_fallback, option=_LINE | _ODD_KEYS)


class Sink(Protocol):
    name: str
    min_severity: Severity

    @property
    def dropped(self) -> int:
        """Events this sink accepted responsibility for and then lost."""
        ...

    def offer(self, event: Event) -> bool:
        """Queue `event` without waiting; False when it had to be dropped."""
        ...

    async def start(self) -> None: ...

    async def close(self, grace: float) -> None:
        """Deliver what is queued within `grace` seconds, then drop the rest."""
        ...


@mypyc_attr(allow_interpreted_subclasses=True)  # sinks and test fakes extend it
class QueuedSink:
    """A bounded queue drained by one named background task; subclasses say how to deliver.

    `deliver` gets batches of at most `batch_max` events; an exception from it drops the
    batch (counted), it never stops the writer. The queue is a plain deque with one wake-up
    future for the writer: `offer` is on the request path, twice per payment, and an
    asyncio.Queue's getter bookkeeping and task accounting cost more than the append.
    """

    # Defaults of instance attributes: a Python subclass of this compiled class (the native
    # build) changes them in its __init__; a class attribute of its own would be ignored.
    batch_max = 256
    linger = 0.0  # seconds to gather a batch after the first event arrives

    def __init__(self, *, name: str, min_severity: Severity, capacity: int) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.name = name
        self.min_severity = min_severity
        self.delivered = 0
        self._dropped = 0
        self._capacity = capacity
        self._pending: deque[Event] = deque()
        self._wakeup: asyncio.Future[None] | None = None  # set while the writer waits
        self._flushed: asyncio.Future[None] | None = None  # `close` waiting for the writer
        self._task: asyncio.Task[None] | None = None
        self._closed = False
        self._busy = 0  # events taken off the queue and not yet delivered

    @property
    def dropped(self) -> int:
        return self._dropped

    def drop(self, count: int, why: str) -> None:
        if count <= 0:
            return
        # Logged at debug only: a sink that is down would otherwise log once per event.
        logger.debug("event sink %s dropped %d event(s): %s", self.name, count, why)
        self._dropped += count

    def offer(self, event: Event) -> bool:
        if self._closed:
            self.drop(1, "sink closed")
            return False
        pending = self._pending
        if len(pending) >= self._capacity:
            self.drop(1, "queue full")
            return False
        pending.append(event)
        self._arrived()
        return True

    def _arrived(self) -> None:
        """An event was queued: wake the writer task if it waits."""
        wakeup = self._wakeup
        if wakeup is not None:
            self._wakeup = None
            if not wakeup.done():
                wakeup.set_result(None)

    async def start(self) -> None:
        if self._task is None and not self._closed:
            self._task = spawn(self._run(), name=f"events.sink.{self.name}")

    async def deliver(self, batch: Sequence[Event]) -> None:
        raise NotImplementedError

    async def _run(self) -> None:
        pending = self._pending
        loop = asyncio.get_running_loop()
        while True:
            if not pending:
                flushed = self._flushed
                if flushed is not None and not flushed.done():
                    flushed.set_result(None)
                self._wakeup = loop.create_future()
                await self._wakeup
                if self.linger > 0:
                    # Wake once per linger period under load, not once per event.
                    await asyncio.sleep(self.linger)
            batch = [pending.popleft() for _ in range(min(len(pending), self.batch_max))]
            if not batch:
                continue
            self._busy = len(batch)
            try:
                await self.deliver(batch)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                logger.warning("event sink %s failed: %s", self.name, exc)
                self.drop(len(batch), f"delivery failed: {exc}")
            self._busy = 0

    async def close(self, grace: float) -> None:
        self._closed = True
        if self._task is not None and (self._pending or self._busy):
            self._flushed = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(grace):
                    await self._flushed
            except TimeoutError:
                logger.warning(
                    "event sink %s did not flush within %.1fs; dropping the rest",
                    self.name,
                    grace,
                )
        if self._task is not None:
            await cancel_and_wait(self._task)
            self._task = None
        self.drop(self._busy + len(self._pending), "closed before delivery")
        self._busy = 0
        self._pending.clear()
        await self.aclose_resources()

    async def aclose_resources(self) -> None:
        """Release what `start` acquired; called once the writer has stopped."""


class StreamSink(QueuedSink):
    """JSON lines on stdout (the default), a file path, or any binary stream.

    Stdout and files are written through a `LineWriter` (proxy.logs): delivering a batch
    is an append to its bounded queue, so a stalled pipe never holds the event loop, a
    worker thread of the loop's executor, or shutdown; lines it cannot take are dropped
    and counted here. An explicit stream (tests, tools) is written from a worker thread.

    Through a writer the sink needs no task: an offered event waits under one timer,
    and `flush` encodes what waits and hands it over in one piece, when the timer fires
    (`linger`), when `batch_max` events wait, or when the proxy has no request in flight
    (the handler calls it then: the work lands between requests, not in the middle of one).
    """

    linger = 0.01  # as proxy.accesslog.LINGER: encoded while the events are cache-warm
    batch_max = 4096  # one hand-off per batch: large batches keep it off the bill

    def __init__(
        self,
        target: IO[bytes] | str | os.PathLike[str] | None = None,
        *,
        name: str = "stdout",
        min_severity: Severity = Severity.INFO,
        capacity: int = 10_000,
    ) -> None:
        super().__init__(name=name, min_severity=min_severity, capacity=capacity)
        self._target = target
        self._stream: IO[bytes] | None = None
        self._writer: LineWriter | None = None
        self._fd: int | None = None  # a file this sink opened and must close
        self._timer: asyncio.TimerHandle | None = None  # armed while events wait
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop `start` ran on

    async def start(self) -> None:
        if self._stream is None and self._writer is None:
            target = self._target
            if target is None:
                self._writer = stdout_writer()
            elif isinstance(target, str | os.PathLike):
                self._fd = await asyncio.to_thread(
                    os.open, target, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644
                )
                self._writer = LineWriter(self._fd, name=self.name)
            else:
                self._stream = target
        if self._writer is not None:
            self._loop = asyncio.get_running_loop()
            self.flush()  # what was offered before start; later events come through `offer`
            return
        await super().start()

    def _arrived(self) -> None:
        loop = self._loop
        if loop is None:
            # Before start, or to an explicit stream: the queued sink's task delivers.
            QueuedSink._arrived(self)
        elif len(self._pending) >= self.batch_max:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(self.linger, self.flush)

    def flush(self) -> None:
        """Encode the waiting events and hand them to the writer, in one piece. Nothing
        to do without a writer: the task delivers to an explicit stream."""
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
        pending, writer = self._pending, self._writer
        if not pending or writer is None:
            return
        batch = list(pending)
        pending.clear()
        try:
            data = b"".join(map(encode_line, batch))
        except Exception as exc:  # as a failed delivery: dropped and counted, never raised
            logger.warning("event sink %s failed: %s", self.name, exc)
            self.drop(len(batch), f"delivery failed: {exc}")
            return
        if writer.offer(data, len(batch)):
            self.delivered += len(batch)
        else:
            self.drop(len(batch), "output full")

    async def close(self, grace: float) -> None:
        self.flush()
        await QueuedSink.close(self, grace)

    async def deliver(self, batch: Sequence[Event]) -> None:
        data = b"".join(map(encode_line, batch))
        if self._writer is not None:
            if self._writer.offer(data, len(batch)):
                self.delivered += len(batch)
            else:
                self.drop(len(batch), "output full")
            return
        stream = self._stream
        assert stream is not None, "deliver runs only after start"
        await asyncio.to_thread(_write, stream, data)
        self.delivered += len(batch)

    async def aclose_resources(self) -> None:
        writer, fd = self._writer, self._fd
        self._writer = self._fd = None
        self._stream = None
        if fd is not None and writer is not None:
            await asyncio.to_thread(writer.close, 2.0)
            os.close(fd)


def _write(stream: IO[bytes], data: bytes) -> None:
    stream.write(data)
    stream.flush()


class _EventCollector(Collector):
    """Reads the bus's per-kind counts and each sink's own drop count at scrape time: plain
    integers on the emit path instead of a locked metric value per event."""

    def __init__(self, sinks: Sequence[Sink], counts: dict[str, int]) -> None:
        self._sinks = sinks
        self._counts = counts

    def collect(self) -> Iterable[CounterMetricFamily]:
        emitted = CounterMetricFamily(
            "payswitch_events", "Events emitted, by kind.", labels=["kind"]
        )
        for kind, n in list(self._counts.items()):
            emitted.add_metric([kind], float(n))
        yield emitted
        family = CounterMetricFamily(
            "payswitch_events_dropped",
            "Events a sink lost: queue full, delivery given up, or closed before delivery.",
            labels=["sink"],
        )
        for sink in self._sinks:
            family.add_metric([sink.name], float(sink.dropped))
        yield family


class EventBus:
    """The `Emitter` the app hands to every producer: stamps events and fans them out."""

    def __init__(
        self,
        sinks: Sequence[Sink],
        *,
        clock: Clock = SYSTEM_CLOCK,
        registry: CollectorRegistry | None = None,
    ) -> None:
        names = [s.name for s in sinks]
        if len(set(names)) != len(names):
            raise ValueError(f"event sink names must be unique: {names}")
        self.sinks = tuple(sinks)
        self.clock = clock
        self._reported: set[str] = set()
        self._checked: set[str] = set()
        self._counts: dict[str, int] = {}
        self._min = min((s.min_severity for s in self.sinks), default=Severity.CRITICAL + 1)
        # Resolved once: a sink's threshold is fixed, and the clock is the bus's for life.
        self._offers = tuple((s.offer, s.min_severity) for s in self.sinks)
        # The system clock's wall is time.time behind one more Python call: skip that call.
        self._wall = time.time if type(clock) is MonotonicClock else clock.wall
        if registry is not None:
            registry.register(_EventCollector(self.sinks, self._counts))

    def emit(self, kind: str, severity: Severity, /, **fields: object) -> None:
        # On the request path twice per payment: one frame, no helper calls.
        try:
            if kind not in self._checked:
                self._check(kind, fields)
            counts = self._counts
            counts[kind] = counts.get(kind, 0) + 1
            if severity < self._min:
                return
            event = tuple.__new__(Event, (kind, severity, self._wall(), new_id(), fields))
            for offer, min_severity in self._offers:
                if severity >= min_severity:
                    offer(event)
        except Exception:  # a bug here must not fail the payment that emitted the event
            self._report_once(f"emit {kind}", "event emission failed", exc_info=True)

    def _check(self, kind: str, fields: dict[str, object]) -> None:
        """Checked on a kind's first emission only, to keep the per-request cost to a set
        lookup; tests emit through RecordingEmitter, which checks every call."""
        for problem in problems(kind, fields):
            self._report_once(problem, "bad event: %s", problem)
        self._checked.add(kind)

    def _report_once(self, key: str, msg: str, *args: object, exc_info: bool = False) -> None:
        if key in self._reported:
            return
        self._reported.add(key)
        logger.error(msg, *args, exc_info=exc_info)

    @property
    def dropped(self) -> Mapping[str, int]:
        return {s.name: s.dropped for s in self.sinks}

    async def start(self) -> None:
        for sink in self.sinks:
            await sink.start()

    async def close(self, grace: float = 5.0) -> None:
        """Flush every sink, all within one `grace` deadline."""
        results = await asyncio.gather(
            *(s.close(grace) for s in self.sinks), return_exceptions=True
        )
        for sink, result in zip(self.sinks, results, strict=True):
            if isinstance(result, BaseException):
                logger.error("closing event sink %s failed", sink.name, exc_info=result)


class RecordingEmitter:
    """An `Emitter` for tests: keeps events and raises on an unknown kind or missing field.

    Production emitters log such mistakes once and carry on; tests should fail on them.
    """

    def __init__(self, *, strict: bool = True, clock: Clock = SYSTEM_CLOCK) -> None:
        self.strict = strict
        self.clock = clock
        self.events: list[Event] = []

    def emit(self, kind: str, severity: Severity, /, **fields: object) -> None:
        found = problems(kind, fields)
        if found and self.strict:
            raise AssertionError("; ".join(found))
        self.events.append(make_event(kind, severity, self.clock.wall(), fields))

    def kinds(self) -> list[str]:
        return [e.kind for e in self.events]

    def of(self, kind: str) -> list[Event]:
        return [e for e in self.events if e.kind == kind]
