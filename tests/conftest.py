"""Suite-wide: a test still running shortly before its timeout prints where it waits.

pytest-timeout stops a hung test with the main thread's stack, which for an asyncio test is
always the event loop's `select`: it does not say which await never returned. So a timer
prints every task's stack (and every thread's) to stderr first, into the test's report."""

from __future__ import annotations

import asyncio
import faulthandler
import sys
import threading
from collections.abc import Iterator

import pytest

#: Seconds before the timeout (pyproject's `timeout`) at which the stacks are printed.
AHEAD = 10.0


def _print_stacks(nodeid: str) -> None:
    out = sys.stderr
    print(f"\n=== {nodeid}: still running {AHEAD:g} s before its timeout ===", file=out)
    for _ in range(3):  # the set of tasks may change under us: the loop is still running
        try:
            tasks = list(asyncio.tasks._all_tasks)  # type: ignore[attr-defined]
            break
        except RuntimeError:
            continue
    else:
        tasks = []
    for task in tasks:
        if task.done():
            continue
        print(f"--- {task!r}", file=out)
        try:
            task.print_stack(file=out)
        except Exception as err:  # a frame that changed while read: say so, go on
            print(f"    (stack unreadable: {err!r})", file=out)
    out.flush()
    faulthandler.dump_traceback(file=out, all_threads=True)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    timeout = float(item.config.getini("timeout") or 0)
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        timeout = float(marker.args[0])
    timer = None
    if timeout > AHEAD:
        timer = threading.Timer(timeout - AHEAD, _print_stacks, args=(item.nodeid,))
        timer.daemon = True
        timer.start()
    try:
        yield
    finally:
        if timer is not None:
            timer.cancel()
