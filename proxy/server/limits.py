"""The listener's limits and the refusal a request gets for breaking one.

Owns: the bounds on what one client connection may send (head, fields, pipelining, body
bytes queued) and on how long it may take, and `Refusal`, raised while a request is parsed.
Must not: hold state; a limit here is a constant every connection reads.
"""

from __future__ import annotations

from typing import Final

MAX_TARGET: Final = 8190  # request target bytes, as nginx's large_client_header_buffers
MAX_FIELD: Final = 16384  # one header line
MAX_HEADERS: Final = 128
MAX_HEAD_BYTES: Final = 64 * 1024
MAX_PIPELINED: Final = 16  # parsed requests waiting their turn before reading pauses
SLICE: Final = 4096  # bytes parsed at a time when a read is larger: the pipelining check's grain
#: Requests one slice can still hold past MAX_PIPELINED (4096 / 18-byte requests = 228);
#: more are refused (503).
MAX_WAITING: Final = 256
MAX_QUEUED_BODY: Final = 1024 * 1024  # body bytes of waiting requests before reading pauses
KEEPALIVE_TIMEOUT: Final = 75.0  # an idle keep-alive connection is closed after this long
READ_TIMEOUT: Final = 60.0  # a request head, or a body, must arrive whole within this long
WRITE_TIMEOUT: Final = 60.0  # a client that takes none of its answers this long is cut off
LINGER: Final = 2.0  # after a refusal, what the client still sends is read and dropped this long
SWEEP_INTERVAL: Final = 1.0
#: While draining, a connection idle this long between requests is closed.
DRAIN_IDLE: Final = 1.0

#: The `reason` label a refusal is counted under, by status.
_REASONS = {
    400: "malformed",
    408: "timeout",
    414: "too_large",
    417: "unsupported",
    431: "too_large",
    501: "unsupported",
    503: "pipeline_full",
    505: "unsupported",
}


class Refusal(Exception):
    """A request refused before it reaches the handler: malformed or over a limit."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail

    @property
    def reason(self) -> str:
        """A low-cardinality name for what was wrong, for the refusals metric."""
        return _REASONS.get(self.status, "other")
