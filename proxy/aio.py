"""Background tasks that are named and referenced, never fire-and-forget.

Owns: `spawn`, the one way the package starts a task, and `TaskGroup`-like bookkeeping so a
task is never garbage-collected mid-flight and its crash is logged; `within`, the package's
awaiting with a time limit.
Must not: know what the tasks do.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Collection, Coroutine
from typing import Any, Protocol, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

_background: set[asyncio.Future[Any]] = set()


def _done(task: asyncio.Task[Any]) -> None:
    _background.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None:
        logger.error("background task %s crashed", task.get_name(), exc_info=exc)


def spawn(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start `coro` as a named task that is kept referenced until it ends."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _background.add(task)
    task.add_done_callback(_done)
    return task


async def within(aw: Awaitable[T], seconds: float) -> T:
    """`aw`'s result, or TimeoutError after `seconds` (then `aw` is cancelled).

    In place of `asyncio.wait_for`, which on Python 3.11 loses a cancellation that comes as
    `aw` finishes: it returns the result and the cancelled task runs on. A loop stopped
    that way (`cancel_and_wait` at shutdown) was never stopped, and the shutdown waited
    for it for ever. `asyncio.timeout` tells its own expiry from a cancellation from outside.
    """
    async with asyncio.timeout(seconds):
        return await aw


async def cancel_and_wait(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel tasks and wait until each has really finished."""
    live = [t for t in tasks if t is not None and not t.done()]
    for t in live:
        t.cancel()
    if live:
        await asyncio.gather(*live, return_exceptions=True)


def keep(task: asyncio.Future[Any]) -> None:
    """Hold a reference to `task` until it ends: for a task whose owner has moved on
    (an abandoned attempt) but whose outcome still matters."""
    if task not in _background:
        _background.add(task)
        task.add_done_callback(_background.discard)


def spawn_owned(coro: Coroutine[Any, Any, T], *, name: str) -> asyncio.Task[T]:
    """Start `coro` as a named task whose caller keeps the reference and consumes its
    result (the retry loop's attempts): no global bookkeeping on the hot path."""
    return asyncio.get_running_loop().create_task(coro, name=name)


class Wakeable(Protocol):
    """Whatever produces one of the awaited results and can say so the moment it is set:
    it calls `waker` right after, if one is set."""

    waker: Callable[[], None] | None


async def first_done(
    pending: Collection[asyncio.Future[Any]], within: float, waking: Wakeable | None = None
) -> None:
    """Return when any of `pending` is done or `within` seconds have passed.

    `asyncio.wait` with FIRST_COMPLETED does the same with set bookkeeping the request
    path does not need; the caller looks at `task.done()` itself. `pending` is not copied:
    it must not change while this waits (the retry loop alone changes its `live`).

    A future's done-callbacks run on the loop's next turn, and the waiter they set wakes
    the caller one turn after that. `waking`, when given, is told to wake the caller as it
    sets its result instead: one turn sooner. The callbacks stay, for every other way a
    result can come (and for a producer that does not call it).
    """
    for t in pending:
        if t.done():
            return
    # The tasks' own loop: it is the running one, and asking for that costs more in
    # place than it should (measured with py-spy under load).
    loop = next(iter(pending)).get_loop() if pending else asyncio.get_running_loop()
    waiter: asyncio.Future[None] = loop.create_future()

    def wake(_: object = None) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for t in pending:
        t.add_done_callback(wake)
    handle = loop.call_later(within, wake)
    if waking is not None:
        waking.waker = wake
    try:
        await waiter
    finally:
        handle.cancel()
        if waking is not None:
            waking.waker = None
        for t in pending:
            t.remove_done_callback(wake)
