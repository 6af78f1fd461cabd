"""The supervisor's log output: the same JSON lines as every process, without a thread.

Owns: `SupervisorLog`, a logging handler that formats with `proxy.logs`' encoder and
holds the lines in a bounded buffer the supervisor's loop writes when stderr can take
them.
Must not: block, nor start a thread: the supervisor forks workers at any time, and it must
still forward SIGTERM when nobody reads its stderr (lines are then dropped and counted).
"""

from __future__ import annotations

import logging
import os
import select
import time
from collections import deque
from typing import Final

#: What one write may carry: a pipe that selects writable takes this much without waiting,
#: and writes this size are not interleaved with the workers' lines.
CHUNK: Final = 4096
DEFAULT_CAPACITY: Final = 256 * 1024


class SupervisorLog(logging.Handler):
    """JSON log lines to `fd`, written by `flush_some` when it is writable."""

    def __init__(self, fd: int = 2, *, capacity: int = DEFAULT_CAPACITY) -> None:
        super().__init__()
        self.fd = fd
        self.capacity = capacity
        self.dropped = 0
        self._lines: deque[bytes] = deque()
        self._bytes = 0

    @classmethod
    def install(cls, level: str, fd: int = 2) -> SupervisorLog:
        """Make this the root logger's only handler, formatting as `proxy.logs` does."""
        from proxy.logs import formatter

        handler = cls(fd)
        handler.setFormatter(formatter())
        root = logging.getLogger()
        for old in list(root.handlers):
            root.removeHandler(old)
        root.addHandler(handler)
        root.setLevel(getattr(logging, level.upper()))
        return handler

    @property
    def pending(self) -> bool:
        return bool(self._lines)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record).encode("utf-8", "replace") + b"\n"
        except Exception:
            self.handleError(record)
            return
        if self._bytes + len(line) > self.capacity:
            self.dropped += 1
            return
        self._lines.append(line)
        self._bytes += len(line)

    def flush_some(self, timeout: float = 0.0) -> None:
        """Write what `fd` takes now (waiting at most `timeout` for it to take any)."""
        while self._lines:
            try:
                _, writable, _ = select.select([], [self.fd], [], timeout)
            except (OSError, ValueError):
                self._drop_all()
                return
            if not writable:
                return
            timeout = 0.0
            line = self._lines[0]
            try:
                written = os.write(self.fd, line[:CHUNK])
            except BlockingIOError:
                return
            except OSError:  # the reader is gone: nothing will ever take these lines
                self._drop_all()
                return
            self._bytes -= written
            if written == len(line):
                self._lines.popleft()
            else:
                self._lines[0] = line[written:]

    def flush_all(self, timeout: float) -> bool:
        """Write everything within `timeout` seconds; False when lines are left over."""
        end = time.monotonic() + timeout
        while self._lines:
            left = end - time.monotonic()
            if left <= 0:
                return False
            self.flush_some(min(left, 0.1))
        return True

    def _drop_all(self) -> None:
        self.dropped += len(self._lines)
        self._lines.clear()
        self._bytes = 0
