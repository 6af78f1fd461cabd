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
_counter = itertools.count(1)


def _fresh_prefix() -> None:
    """A forked child (a worker of `--workers N`) must not repeat its parent's ids, nor
    its siblings': it draws its own prefix and counts from 1."""
    global _PREFIX, _counter
    _PREFIX = os.urandom(8).hex()
    _counter = itertools.count(1)


os.register_at_fork(after_in_child=_fresh_prefix)


def new_id() -> str:
    return f"{_PREFIX}{next(_counter):012x}"
