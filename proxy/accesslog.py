"""One structured line per request: route, region, every gateway tried and why it was
left, final status and durations.

Owns: `AccessLog`, which buffers lines and writes them in batches from a background task,
so a slow stdout costs the request path one list append.
Must not: decide what happened to a request; the handler tells it.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from typing import BinaryIO

import orjson

from proxy.aio import cancel_and_wait, spawn

logger = logging.getLogger(__name__)

MAX_BUFFERED = 10_000


class AccessLog:
    def __init__(self, stream: BinaryIO | None = None, *, interval: float = 0.1) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer
        self._buf: list[bytes] = []
        self._interval = interval
        self._task: asyncio.Task[None] | None = None
        self.dropped = 0

    def log(self, record: dict[str, object]) -> None:
        if len(self._buf) >= MAX_BUFFERED:
            self.dropped += 1
            return
        self._buf.append(orjson.dumps(record) + b"\n")

    async def start(self) -> None:
        self._task = spawn(self._run(), name="access-log-writer")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.flush()

    def flush(self) -> None:
        if not self._buf:
            return
        data, self._buf = b"".join(self._buf), []
        try:
            self._stream.write(data)
            self._stream.flush()
        except (OSError, ValueError):
            logger.warning("access log write failed; %d bytes dropped", len(data))

    async def close(self) -> None:
        await cancel_and_wait(self._task)
        self.flush()
