"""One structured line per request: route, region, every gateway tried and why it was
left, final status and durations.

Owns: `AccessLog`, which encodes a record through the shared log encoder (proxy.logs:
RFC 3339 `time`, the current span's `trace_id`/`span_id`) and queues it on a
`LineWriter`, so a slow or stuck stdout costs the request path one encode and one append,
and a full queue drops and counts instead of waiting.
Must not: decide what happened to a request; the handler tells it.
"""

from __future__ import annotations

from proxy.logs import LineWriter, encode, stdout_writer


class AccessLog:
    def __init__(self, writer: LineWriter | None = None, *, trace_ids: bool = True) -> None:
        self._writer = writer if writer is not None else stdout_writer()
        self._trace_ids = trace_ids  # off with tracing: no span to look up

    @property
    def dropped(self) -> int:
        """Lines lost on this log's output (shared with whatever else writes there)."""
        return self._writer.dropped

    def log(self, record: dict[str, object]) -> None:
        """Write `record` as one JSON line; a `ts` (unix seconds) becomes its `time`."""
        self._writer.offer(encode(record, trace_ids=self._trace_ids))

    async def start(self) -> None:
        """Nothing to start: the writer's thread runs from its creation."""

    async def close(self) -> None:
        """Nothing to stop: the process's writers are flushed at exit (proxy.logs)."""
