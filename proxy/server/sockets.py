"""What the listener asks of a client socket beneath its transport.

Owns: closing with a reset (SO_LINGER 0), and peeking whether the client has sent bytes
the event loop has not read yet.
Must not: read or write data; the transport owns the socket's bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct

_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close with a reset


def reset(transport: asyncio.Transport) -> None:
    """Cut the connection with a reset, so even a close-delimited answer cannot pass for
    complete."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _RESET)
    transport.abort()


def has_unread(transport: asyncio.Transport) -> bool:
    """Are bytes from the client waiting in the socket? Peeked on a duplicate of the
    descriptor (the transport's socket object offers no recv), without blocking."""
    sock = transport.get_extra_info("socket")
    if sock is None:
        return False
    try:
        with socket.fromfd(sock.fileno(), sock.family, sock.type) as peek:
            return bool(peek.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT))
    except OSError:  # nothing to read (EAGAIN), or the socket is gone
        return False
