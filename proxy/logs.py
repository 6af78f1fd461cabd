"""Log output for the whole process: one JSON encoder, and writers that never block.

Owns: `LineWriter` (bytes to a file descriptor from a daemon thread, behind a bounded
queue that drops and counts when the destination stops reading), the process's stdout and
stderr writers, the structlog processor chain every log line goes through (app logs via
the stdlib `logging` handler, access lines via `encode`), the RFC 3339 UTC timestamp form
events share, and `setup` for the command line.
Must not: block the event loop on a write, ever; nor decide what is logged.

Why structlog: its processors are plain functions over a dict, so the app logs (stdlib
records, rendered by `ProcessorFormatter`) and the access log (a dict built per request,
run through the same chain without a logger object) share one encoder; python-json-logger
formats stdlib records only, which would put a `LogRecord` on the request path.
"""

from __future__ import annotations

import atexit
import logging
import os
import select
import sys
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, MutableMapping
from types import TracebackType
from typing import Any, Final

import orjson
import structlog
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from proxy import clock
from proxy.spans import current_context

logger = logging.getLogger(__name__)

#: Bytes a writer holds for a destination that is not reading; beyond it lines drop.
DEFAULT_CAPACITY: Final = 4 << 20
#: Seconds between a busy writer's looks for lines: how late a line may reach its output.
POLL_INTERVAL: Final = 0.02
#: Empty looks in a row after which a writer parks until the next offer wakes it (0.5 s).
PARK_AFTER: Final = 25
#: Seconds between `flush`'s looks at what the writer has done.
FLUSH_POLL: Final = 0.001

#: In proxy.clock, which the native build compiles: it formats every log and event time.
iso_millis = clock.iso_millis


class LineWriter:
    """Whole lines to one file descriptor, written by a daemon thread.

    `offer` appends to a bounded in-memory queue; it never waits on the destination. When
    the queue is full (a log shipper that stopped reading) the offered lines are dropped
    and counted. Writes use `os.write` on the raw descriptor, not `sys.stdout`, so a thread
    stuck in a write holds no lock the interpreter needs to exit.

    A busy writer is not woken per offer: it looks for lines every `POLL_INTERVAL` on its
    own. Waking it from the event loop cost each hand-off a lock handshake in Python, a
    context switch and a turn of the GIL, in the middle of whatever request the loop was
    serving (measured at 400 requests/s: 70 us on the median answer). Only a writer that
    found nothing for `PARK_AFTER` polls parks, and the next offer wakes it.
    """

    def __init__(self, fd: int, *, name: str, capacity: int = DEFAULT_CAPACITY) -> None:
        self.fd = fd
        self.name = name
        self.capacity = capacity
        self.dropped = 0  # lines
        self.written = 0  # lines
        self._lock = threading.Lock()  # guards every field below
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._pending_lines = 0
        self._offered = 0  # offers taken so far
        self._done = 0  # offers written or dropped so far (the writer's count)
        # Released to wake the thread early; `_rung` says it is released and not yet taken,
        # so it is released once per wake-up whoever rings.
        self._bell = threading.Lock()
        self._bell.acquire()
        self._rung = False
        self._parked = False  # the thread waits for the bell without a timeout
        self._closing = False
        self._inflight = 0  # lines taken by the thread and not yet written
        self._given_up = False  # close timed out: in-flight lines were counted as dropped
        self._thread = threading.Thread(target=self._run, name=f"log-writer-{name}", daemon=True)
        self._thread.start()

    def offer(self, data: bytes, lines: int | None = None) -> bool:
        """Queue `data` (one or more whole lines: `lines` of them, counted here when not
        given); False if it was dropped."""
        if lines is None:
            lines = data.count(b"\n")
        with self._lock:
            if self._closing or self._pending_bytes + len(data) > self.capacity:
                self.dropped += lines or 1
                return False
            self._pending.append(data)
            self._pending_bytes += len(data)
            self._pending_lines += lines
            self._offered += 1
            if self._parked:
                self._parked = False
                self._ring()
        return True

    def _ring(self) -> None:
        """Wake the thread now; called with `_lock` held."""
        if not self._rung:
            self._rung = True
            self._bell.release()

    def _run(self) -> None:
        bell, idle = self._bell, 0
        while True:
            rung = bell.acquire() if self._parked else bell.acquire(timeout=POLL_INTERVAL)
            with self._lock:
                if rung:
                    self._rung = False
                chunks, offered = self._pending, self._offered
                if chunks:
                    self._pending, self._pending_bytes = [], 0
                    self._inflight, self._pending_lines = self._pending_lines, 0
                    idle = 0
                elif self._closing:
                    self._done = offered
                    return
                else:
                    self._done = offered
                    idle += 1
                    self._parked = idle >= PARK_AFTER
            if chunks:
                self._write(b"".join(chunks), offered)

    def _write(self, data: bytes, offered: int) -> None:
        ok = True
        try:
            for chunk in _whole_lines(data) if _shared_outputs else (data,):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self.fd, view) :]
        except OSError:
            # The reader went away (EPIPE) or the descriptor is gone: nothing to retry.
            ok = False
        with self._lock:
            lines, self._inflight = self._inflight, 0
            if not self._given_up:
                if ok:
                    self.written += lines
                else:
                    self.dropped += lines
            self._done = offered  # last: `flush` reads it without the lock

    def flush(self, timeout: float) -> bool:
        """Wait until everything offered so far is written or dropped; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            target = self._offered
            if self._done >= target:
                return True
            self._ring()
        while True:
            time.sleep(FLUSH_POLL)
            if self._done >= target:
                return True
            if time.monotonic() >= deadline:
                return False

    def close(self, timeout: float) -> None:
        """Write what is queued within `timeout` seconds, then stop taking lines.

        A thread stuck on a destination that never reads is left behind: it is a daemon
        and holds no interpreter lock, so the process still exits.
        """
        done = self.flush(timeout)
        with self._lock:
            self._closing = True
            if not done:
                self._given_up = True
                # Counted once: a second close (an uncaught exception, then atexit) adds none.
                self.dropped += self._inflight + self._pending_lines
                self._inflight = 0
                self._pending, self._pending_bytes, self._pending_lines = [], 0, 0
            self._ring()


#: Other processes write to this process's stdout and stderr (the workers of one
#: supervisor): writes are then cut at line ends, at most PIPE_BUF bytes each, which a pipe
#: never interleaves with another writer's, so every line reaches the reader whole.
_shared_outputs = False


def share_outputs() -> None:
    """Say that other processes write to the same stdout and stderr."""
    globals()["_shared_outputs"] = True


def _whole_lines(data: bytes, limit: int = select.PIPE_BUF) -> Iterator[bytes]:
    """`data` in pieces of whole lines of at most `limit` bytes (a longer line alone)."""
    start, size = 0, len(data)
    while size - start > limit:
        cut = data.rfind(b"\n", start, start + limit)
        end = cut + 1 if cut >= start else data.find(b"\n", start + limit) + 1 or size
        yield data[start:end]
        start = end
    if start < size:
        yield data[start:]


_writers: dict[int, LineWriter] = {}
_writers_lock = threading.Lock()


def writer_for(fd: int, name: str) -> LineWriter:
    """The process's one writer for `fd` (1: stdout, 2: stderr), started on first use."""
    with _writers_lock:
        w = _writers.get(fd)
        if w is None:
            w = _writers[fd] = LineWriter(fd, name=name)
        return w


def stdout_writer() -> LineWriter:
    return writer_for(1, "stdout")


def stderr_writer() -> LineWriter:
    return writer_for(2, "stderr")


def close_writers(timeout: float = 2.0) -> None:
    """Give every writer `timeout` seconds in all to write what it holds; for exit."""
    deadline = time.monotonic() + timeout
    for w in list(_writers.values()):
        w.close(max(0.0, deadline - time.monotonic()))


class WriterCollector(Collector):
    """`payswitch_log_lines_dropped_total` per output, read from the writers at scrape."""

    def collect(self) -> Iterable[CounterMetricFamily]:
        family = CounterMetricFamily(
            "payswitch_log_lines_dropped",
            "Log, access-log and event lines lost because their output did not keep up.",
            labels=["output"],
        )
        for w in list(_writers.values()):
            family.add_metric([w.name], float(w.dropped))
        yield family


# -- the encoder -------------------------------------------------------------------------

EventDict = MutableMapping[str, Any]


def add_time(_: object, __: str, event: EventDict) -> EventDict:
    event["time"] = iso_millis(time.time())
    return event


def add_trace_ids(_: object, __: str, event: EventDict) -> EventDict:
    """Trace and span id of the current span, on every line made inside a request."""
    ctx = current_context()
    if ctx is not None:
        event["trace_id"] = format(ctx.trace_id, "032x")
        event["span_id"] = format(ctx.span_id, "016x")
    return event


def json_default(value: object) -> object:
    """What the encoder writes for a value JSON has no form for: sets and tuples as
    lists, anything else as its text."""
    if isinstance(value, set | frozenset | tuple):
        return list(value)
    return str(value)


def encode(record: dict[str, object], *, trace_ids: bool = True) -> bytes:
    """An access-log record as one JSON line with the same `time` and trace ids as every
    other line (`time` first; a `ts` in unix seconds gives it). Cheap enough for the
    request path: one dict and orjson. `trace_ids=False` skips the span lookup, for when
    tracing is off."""
    ts = record.pop("ts", None)
    event: EventDict = {
        "time": iso_millis(ts if type(ts) is float else time.time()),
        **record,
    }
    if trace_ids:
        add_trace_ids(None, "info", event)
    return orjson.dumps(event, default=json_default, option=orjson.OPT_APPEND_NEWLINE)


def _exception_field(_: object, __: str, event: EventDict) -> EventDict:
    exc_info = event.pop("exc_info", None)
    if exc_info:
        if not isinstance(exc_info, tuple):
            exc_info = sys.exc_info()
        if exc_info[0] is not None:
            event["exception"] = "".join(traceback.format_exception(*exc_info))
    return event


def _render(_: object, __: str, event: EventDict) -> str:
    return orjson.dumps(event, default=json_default).decode()


def formatter() -> structlog.stdlib.ProcessorFormatter:
    """Stdlib records as one JSON object each: time, level, logger, msg, exception."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            add_time,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.stdlib.ExtraAdder(),
            add_trace_ids,
        ],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            _exception_field,
            structlog.processors.EventRenamer("msg"),
            _render,
        ],
    )


class WriterHandler(logging.Handler):
    """A logging handler that formats in the caller and queues on a `LineWriter`."""

    def __init__(self, writer: LineWriter) -> None:
        super().__init__()
        self.writer = writer

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self.writer.offer(line.encode("utf-8", "replace") + b"\n")


def setup(level: str, writer: LineWriter | None = None) -> None:
    """Send every app log line, warning and uncaught exception through the encoder to
    stderr (or `writer`). Idempotent: replaces handlers a previous call installed."""
    handler = WriterHandler(writer or stderr_writer())
    handler.setFormatter(formatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    # watchfiles says "N changes detected" at info on every batch: noise once per rules
    # write, a flood when something writes into the rules directory. The reload it causes
    # is logged; its own lines show with --log-level debug.
    logging.getLogger("watchfiles").setLevel(
        logging.DEBUG if level.upper() == "DEBUG" else logging.WARNING
    )
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_thread_uncaught
    atexit.register(close_writers)


def _log_uncaught(kind: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    logging.getLogger("payswitch").critical("uncaught exception", exc_info=(kind, exc, tb))
    close_writers()


def _log_thread_uncaught(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("payswitch").error(
        "uncaught exception in thread %s",
        args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )
