"""The latency tests' steal watch: a request is dropped only when steal was counted while
it was in flight (or just before, while the loop caught up)."""

from __future__ import annotations

import time

from tests.support import HostSteal


class Counter:
    """A steal counter that jumps by 10 ms once, when told to."""

    def __init__(self) -> None:
        self.value: float | None = 1.0

    def __call__(self) -> float | None:
        return self.value


def test_only_requests_in_flight_during_a_steal_are_touched() -> None:
    counter = Counter()
    with HostSteal(every=0.002, settle=0.010, read=counter) as steal:
        time.sleep(0.3)
        before = time.monotonic()
        counter.value = 1.01
        time.sleep(0.02)
        after = time.monotonic()
        time.sleep(0.15)
    assert steal.stolen_spans == 1
    assert steal.touched(before - 0.001, after)  # in flight across the jump
    assert not steal.touched(before - 0.2, before - 0.19)  # answered well before it
    assert not steal.touched(after + 0.1, after + 0.11)  # sent after it had settled


def test_nothing_is_touched_where_the_kernel_does_not_count_steal() -> None:
    counter = Counter()
    counter.value = None
    with HostSteal(every=0.002, read=counter) as steal:
        time.sleep(0.02)
    assert steal.stolen_spans == 0
    assert not steal.touched(0.0, time.monotonic())
