"""Ids: unique within a process, and across processes forked from one another."""

from __future__ import annotations

import os

import pytest

from proxy.ids import new_id


def test_ids_within_a_process_are_unique_and_share_a_prefix() -> None:
    ids = [new_id() for _ in range(1000)]
    assert len(set(ids)) == 1000
    assert len({i[:16] for i in ids}) == 1
    # 16 hex digits of prefix, then the counter as 12 zero-padded hex digits.
    assert all(len(i) == 28 and int(i, 16) >= 0 for i in ids)
    counters = [int(i[16:], 16) for i in ids]
    assert counters == list(range(counters[0], counters[0] + 1000)) and counters[0] < 1 << 40


# Forking from a test process that may run threads (Python 3.12 warns); the child
# makes a few plain calls and exits.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    """Workers are forked after the package is imported: each must draw its own prefix."""
    before = new_id()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        os.write(w, ",".join(new_id() for _ in range(3)).encode())
        os._exit(0)
    os.close(w)
    child = os.read(r, 4096).decode().split(",")
    os.close(r)
    assert os.waitpid(pid, 0)[1] == 0
    after = [new_id() for _ in range(3)]
    assert not set(child) & {before, *after}
    assert child[0][:16] != before[:16]


def test_the_counter_carries_into_its_upper_digits() -> None:
    """The last byte comes from a table, the digits before it once per 256 ids: the ids
    still count up by one across every carry."""
    ids = [new_id() for _ in range(3 * 256 + 5)]
    counters = [int(i[16:], 16) for i in ids]
    assert counters == list(range(counters[0], counters[0] + len(ids)))
    assert all(len(i) == 28 for i in ids)
