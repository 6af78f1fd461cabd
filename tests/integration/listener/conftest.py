"""The listener's tests run on both event loops: uvloop in production, asyncio's own where
uvloop is not installed. Their transports differ in exactly the places these tests probe
(half-close, write_eof, pause/resume, abort)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import pytest
import uvloop


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> Mapping[str, Callable[[], asyncio.AbstractEventLoop]]:
    return {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}
