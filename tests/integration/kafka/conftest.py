"""Kafka tests: aiokafka clients the code under test abandons on a slow shutdown (a flush
cut short by its timeout) are finalised here, after the test that made them, instead of
in whichever test the garbage collector happens to run next."""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def collect_abandoned_clients() -> Iterator[None]:
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
