"""proxy.aio.first_done: woken by the first result, by its time, or at once by a producer
that says its result is set; proxy.aio.within: a time limit that never loses a
cancellation."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from pathlib import Path

import pytest

from proxy.aio import first_done, within


class Producer:
    """Sets a future's result and, like an upstream connection, calls `waker` after."""

    def __init__(self, fut: asyncio.Future[int]) -> None:
        self.fut = fut
        self.waker: Callable[[], None] | None = None

    def settle(self) -> None:
        self.fut.set_result(1)
        if self.waker is not None:
            self.waker()


async def turns_to_wake(waking: bool) -> int:
    """Turns of the loop that end between the result being set and the waiter running
    again (0: it runs on the very next turn)."""
    loop = asyncio.get_running_loop()
    producer = Producer(loop.create_future())
    turns = -1
    running = True

    def tick() -> None:
        nonlocal turns
        turns += 1
        if running:
            loop.call_soon(tick)

    def settle() -> None:
        producer.settle()
        tick()  # counts from here: one call_soon per turn from now on

    loop.call_soon(settle)
    await first_done([producer.fut], 5.0, producer if waking else None)
    running = False
    assert producer.waker is None  # not left behind for a later result
    return turns


async def test_a_producer_that_says_so_wakes_the_waiter_a_turn_sooner() -> None:
    plain = await turns_to_wake(waking=False)
    told = await turns_to_wake(waking=True)
    assert told == plain - 1
    assert told == 0  # on the very next turn


async def test_the_time_still_bounds_the_wait_with_a_waking_producer() -> None:
    loop = asyncio.get_running_loop()
    producer = Producer(loop.create_future())
    started = loop.time()
    await first_done([producer.fut], 0.05, producer)
    assert loop.time() - started >= 0.04
    assert not producer.fut.done()
    assert producer.waker is None


async def test_a_result_already_in_returns_at_once() -> None:
    loop = asyncio.get_running_loop()
    producer = Producer(loop.create_future())
    producer.settle()
    await first_done([producer.fut], 5.0, producer)
    assert producer.waker is None


async def test_within_gives_the_result_or_times_out() -> None:
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    loop.call_later(0.01, fut.set_result, 7)
    assert await within(fut, 5) == 7
    slow: asyncio.Future[int] = loop.create_future()
    with pytest.raises(TimeoutError):
        await within(slow, 0.01)
    assert slow.cancelled()  # what timed out is cancelled, as a late answer must not be read


async def test_within_keeps_a_cancellation_that_comes_as_the_result_does() -> None:
    """The task is cancelled in the same turn of the loop as its awaited result is set.
    `asyncio.wait_for` (3.11) returns the result then, and the task runs on: a checker
    stopped at that moment went on probing, and the shutdown waiting for it never ended."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[int] = loop.create_future()
    task = loop.create_task(within(fut, 5))
    await asyncio.sleep(0)  # the task now waits on fut
    fut.set_result(1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


def test_the_package_never_awaits_through_asyncio_wait_for() -> None:
    root = Path(__file__).resolve().parents[2] / "proxy"
    uses = [
        f"{path.relative_to(root.parent)}:{n}"
        for path in sorted(root.rglob("*.py"))
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
        if re.search(r"\bwait_for\(", line) and "def " not in line and "_wait_for(" not in line
    ]
    assert uses == [], "use proxy.aio.within: asyncio.wait_for can lose a cancellation"
