"""One structured line per request: route, region, every gateway tried and why it was
left, final status and durations.

Owns: `AccessRecord` (what the handler knows of a finished request, as a plain tuple) and
`AccessLog`, which writes records as JSON lines in the shared log form (proxy.logs: RFC
3339 `time` first, the request span's `trace_id`/`span_id` last) on a `LineWriter`. The
request path only appends its record to a batch; the batch is encoded and handed to the
writer in one piece a moment later (`LINGER`), at once when it is large, or as soon as the
proxy has no request in flight (the handler calls `flush` then), so a request pays neither
an encode nor a hand-off to the writer's thread, and a slow or stuck stdout costs nothing
more than a full queue that drops and counts.
Must not: decide what happened to a request; the handler tells it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final, NamedTuple

import orjson

from proxy.clock import iso_millis
from proxy.errors import Tried
from proxy.logs import LineWriter, encode, json_default, stdout_writer
from proxy.spans import current_context

logger = logging.getLogger(__name__)

#: Seconds a record may wait for others before its batch is written. Short: a batch
#: encoded while its records are still in the CPU's caches costs less (measured: 50 ms
#: cost about 5 us more per request than 10 ms at 8,000 requests/s), and ten hand-offs a
#: second to the writer's thread are nothing.
LINGER: Final = 0.01
#: Records in one batch at most; a full batch is written at once.
BATCH_MAX: Final = 1024


class AccessRecord(NamedTuple):
    """One request, in the order its line shows it. A tuple: built on the request path,
    turned into a line later."""

    ts: float  # unix seconds, written as `time`
    method: str
    path: str
    status: int
    route: str
    region: str | None
    gateway: str | None
    transaction_id: str | None
    tried: tuple[Tried, ...]
    error: str | None
    duration_ms: float
    client: str | None
    trace: tuple[str, str] | None = None  # (trace id, span id) of the request's span


def line(r: AccessRecord) -> bytes:
    """`r` as one JSON line, newline included: the bytes `proxy.logs.encode` makes of the
    same fields given as a dict with `log: access`."""
    event: dict[str, object] = {
        "time": iso_millis(r.ts),
        "log": "access",
        "method": r.method,
        "path": r.path,
        "status": r.status,
        "route": r.route,
        "region": r.region,
        "gateway": r.gateway,
        "transaction_id": r.transaction_id,
        "tried": [{"gateway": t.gateway, "outcome": t.outcome} for t in r.tried],
        "error": r.error,
        "duration_ms": r.duration_ms,
        "client": r.client,
    }
    if r.trace is not None:
        event["trace_id"], event["span_id"] = r.trace
    return orjson.dumps(event, default=json_default, option=orjson.OPT_APPEND_NEWLINE)


class AccessLog:
    def __init__(
        self,
        writer: LineWriter | None = None,
        *,
        trace_ids: bool = True,
        linger: float = LINGER,
        batch_max: int = BATCH_MAX,
    ) -> None:
        self._writer = writer if writer is not None else stdout_writer()
        self._trace_ids = trace_ids  # off with tracing: no span to look up
        self._linger = linger
        self._batch_max = batch_max
        self._batch: list[AccessRecord] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def dropped(self) -> int:
        """Lines lost on this log's output (shared with whatever else writes there)."""
        return self._writer.dropped

    def log(self, record: dict[str, object]) -> None:
        """Write `record` as one JSON line now; a `ts` (unix seconds) becomes its `time`."""
        self._writer.offer(encode(record, trace_ids=self._trace_ids))

    def request(self, record: AccessRecord) -> None:
        """Write `record` with the next batch; called on the event loop, inside the
        request's span when tracing is on (its ids are read now, written later)."""
        if self._trace_ids and record.trace is None:
            # Through proxy.spans: importing OpenTelemetry here would load it with
            # tracing off too.
            ctx = current_context()
            if ctx is not None:
                record = record._replace(
                    trace=(format(ctx.trace_id, "032x"), format(ctx.span_id, "016x"))
                )
        if self._closed:
            self._writer.offer(line(record))
            return
        batch = self._batch
        batch.append(record)
        if len(batch) >= self._batch_max:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._linger, self.flush)

    def flush(self) -> None:
        """Encode the waiting records and queue them on the writer, in one piece."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch = self._batch
        if not batch:
            return
        self._batch = []
        try:
            data = b"".join(map(line, batch))
        except Exception:  # never into the request that flushed, nor the loop's timer
            logger.exception("access log: %d line(s) could not be encoded", len(batch))
            return
        self._writer.offer(data, len(batch))

    async def start(self) -> None:
        """Nothing to start: the writer's thread runs from its creation."""

    async def close(self) -> None:
        """Write what waits; later records are written one by one. The process's writers
        are flushed at exit (proxy.logs)."""
        self._closed = True
        self.flush()
