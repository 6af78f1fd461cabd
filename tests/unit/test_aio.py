"""proxy.aio.first_done: woken by the first result, by its time, or at once by a producer
that says its result is set."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from proxy.aio import first_done


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
