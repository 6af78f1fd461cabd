"""Transaction and attempt ids: unique across processes, cheap on the hot path.

Owns: `new_id`, a per-process random prefix (64 bits from the OS) followed by a counter, so
an id costs a string format rather than a system call, and ids from two sidecar replicas
or two restarts never collide in practice; a forked process draws a prefix of its own.
Must not: be used for anything secret; these ids are guessable within a process.
"""

from __future__ import annotations

import os
from typing import Final

#: Two hex digits for each value of the counter's last byte.
_HEX2: Final = tuple(f"{i:02x}" for i in range(256))
#: `hex(n + _BASE40)[3:]` is n's last 10 hex digits, zero-padded.
_BASE40: Final = 1 << 40


class _Ids:
    """A 16-hex-digit random prefix, then a counter as 12 zero-padded hex digits.

    The counter's last byte comes from a table; the 26 digits before it are formatted once
    per 256 ids: four ids are drawn per request, and formatting an int costs more than the
    rest of the id."""

    __slots__ = ("head", "n", "prefix")

    def __init__(self) -> None:
        self.prefix = ""
        self.head = ""
        self.n = 0
        self.reset()

    def reset(self) -> None:
        self.prefix = os.urandom(8).hex()
        self.n = 0
        self.head = self.prefix + "0" * 10

    def draw(self) -> str:
        n = self.n + 1
        self.n = n
        low = n & 0xFF
        if low == 0:
            self.head = self.prefix + hex((n >> 8) + _BASE40)[3:]
        return self.head + _HEX2[low]


_IDS: Final = _Ids()


def _fresh_prefix() -> None:
    """A forked child (a worker of `--workers N`) must not repeat its parent's ids, nor
    its siblings': it draws its own prefix and counts from 1."""
    _IDS.reset()


os.register_at_fork(after_in_child=_fresh_prefix)


def new_id() -> str:
    return _IDS.draw()
