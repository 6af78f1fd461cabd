"""Transaction and attempt ids: unique across processes, cheap on the hot path.

Owns: `new_id`, a per-process random prefix (64 bits from the OS) followed by a counter, so
an id costs a string format rather than a system call, and ids from two sidecar replicas
or two restarts never collide in practice; a forked process draws a prefix of its own.
Must not: be used for anything secret; these ids are guessable within a process.
"""

from __future__ import annotations

import itertools
import os

_PREFIX = os.urandom(8).hex()
#: The counter runs from 2**48 + 1, so `hex(n)[3:]` is n's last 12 hex digits: the same
#: zero-padded id as `{n:012x}` for the first 2**48 ids, without formatting an int to a
#: width (about three times slower, and four ids are drawn per request).
_BASE = 1 << 48
_counter = itertools.count(_BASE + 1)


def _fresh_prefix() -> None:
    """A forked child (a worker of `--workers N`) must not repeat its parent's ids, nor
    its siblings': it draws its own prefix and counts from 1."""
    global _PREFIX, _counter
    _PREFIX = os.urandom(8).hex()
    _counter = itertools.count(_BASE + 1)


os.register_at_fork(after_in_child=_fresh_prefix)


def new_id() -> str:
    return _PREFIX + hex(next(_counter))[3:]
