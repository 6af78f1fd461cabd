"""The deadlines of one connection, checked by the listener's once-a-second sweep.

Owns: keep-alive idle, the request head and body (whole, not between bytes: a trickle
does not hold a connection), the client reading its answers, lingering and graceful
closes, and closing idle connections while the listener drains.
Must not: run per request or per read; the sweep is the only clock the listener reads
for deadlines.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from proxy.http import BodyTimeout
from proxy.server.connection import Phase
from proxy.server.limits import DRAIN_IDLE, Refusal

if TYPE_CHECKING:
    from proxy.server.connection import Connection


def sweep(conn: Connection, now: float) -> None:
    """Enforce `conn`'s deadlines at time `now`."""
    transport = conn.transport
    server = conn.server
    if transport is None:
        return
    phase = conn.phase
    if conn.write_paused and now - conn.write_paused_at > server.write_timeout:
        conn.abort()  # the client stopped reading its answers
    elif phase is Phase.CLOSING:
        if now - conn.phase_since > server.write_timeout:
            conn.abort()  # a close still waiting for the client to take our bytes
    elif phase is Phase.LINGERING:
        if now > conn.linger_until and conn.current is None:
            conn.close()
    elif conn.current is None and not conn.held:
        _between_requests(conn, now)
    else:
        incoming = conn.incoming
        if (
            incoming is conn.current
            and incoming is not None
            and incoming.error is None
            and now - incoming.since > server.read_timeout
        ):
            incoming.error = BodyTimeout("the request body did not arrive in time")
            incoming.wake()


def _between_requests(conn: Connection, now: float) -> None:
    server = conn.server
    head = conn.head
    if head.in_head:
        if now - head.head_since > server.read_timeout and not conn.backlog:
            conn.refuse(Refusal(408, "the request head did not arrive in time"))
    elif conn.idle():
        idle = now - conn.idle_since
        if idle > server.keepalive_timeout or (
            # Draining: a connection idle for a while is closed between requests; one
            # just made, or with bytes not yet read, is left to send its request.
            server.winding_down and idle > DRAIN_IDLE and not conn.pending()
        ):
            conn.close()
