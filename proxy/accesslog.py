"""One structured line per request: route, region, every gateway tried and why it was
left, final status and durations.

Owns: `AccessLog`, which encodes records through the shared log encoder (proxy.logs:
RFC 3339 `time`, the current span's `trace_id`/`span_id`) and queues them on a
`LineWriter`. The request path only appends its record to a batch; the batch is encoded
and handed to the writer in one piece a moment later (`LINGER`), or at once when it is
large, so a request pays neither an encode nor a hand-off to the writer's thread, and a
slow or stuck stdout costs nothing more than a full queue that drops and counts.
Must not: decide what happened to a request; the handler tells it.
"""

from __future__ import annotations

import asyncio
from typing import Final

from proxy.logs import LineWriter, add_trace_ids, encode, stdout_writer

#: Seconds a record may wait for others before its batch is written.
LINGER: Final = 0.05
#: Records in one batch at most; a full batch is written at once.
BATCH_MAX: Final = 1024


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
        self._batch: list[dict[str, object]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._closed = False

    @property
    def dropped(self) -> int:
        """Lines lost on this log's output (shared with whatever else writes there)."""
        return self._writer.dropped

    def log(self, record: dict[str, object]) -> None:
        """Write `record` as one JSON line now; a `ts` (unix seconds) becomes its `time`."""
        self._writer.offer(encode(record, trace_ids=self._trace_ids))

    def add(self, record: dict[str, object]) -> None:
        """Write `record` (as `log` does) with the next batch; called on the event loop.

        The record is kept as given until then: the caller must not change it."""
        if self._closed:
            self.log(record)
            return
        if self._trace_ids:
            # The span is the caller's current one: looked up now, encoded later. Added
            # last, as `encode` would.
            add_trace_ids(None, "info", record)
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
        self._writer.offer(b"".join([encode(r, trace_ids=False) for r in batch]))

    async def start(self) -> None:
        """Nothing to start: the writer's thread runs from its creation."""

    async def close(self) -> None:
        """Write what waits; later records are written one by one. The process's writers
        are flushed at exit (proxy.logs)."""
        self._closed = True
        self.flush()
