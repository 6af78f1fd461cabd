"""The connection cap, its default from the open-files limit, refusals counted and logged
at a bounded rate, and overload as readiness sees it; the clock is the test's."""

from __future__ import annotations

import logging
import resource
import subprocess
import sys

import pytest
from prometheus_client import CollectorRegistry

from proxy.server.admission import (
    LOG_EVERY,
    OVERLOAD_HOLD,
    ConnectionCap,
    default_max_connections,
)
from proxy.settings import from_sources


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    ("nofile", "cap"),
    [(256, 204), (1024, 819), (20000, 4096), (1, 1), (resource.RLIM_INFINITY, 4096)],
    ids=["256", "1024", "large", "tiny", "unlimited"],
)
def test_the_default_cap_stays_under_the_open_files_limit(nofile: int, cap: int) -> None:
    assert default_max_connections(nofile) == cap


def test_admit_up_to_the_cap_then_refuse_and_count() -> None:
    registry = CollectorRegistry()
    clock = Clock()
    cap = ConnectionCap(2, registry=registry, clock=clock)

    def overloaded() -> bool:
        return cap.overloaded

    assert [cap.admit() for _ in range(3)] == [True, True, False]
    assert overloaded() and cap.open == 2
    cap.release()
    assert overloaded(), "a refusal a moment ago still counts as overload"
    clock.now += OVERLOAD_HOLD + 0.1
    assert not overloaded()
    cap.refused("malformed")
    assert not overloaded(), "a malformed request is not overload"

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("payswitch_listener_refusals_total", reason="max_connections") == 1
    assert sample("payswitch_listener_refusals_total", reason="malformed") == 1
    assert sample("payswitch_listener_connections") == 1
    assert sample("payswitch_listener_max_connections") == 2


def test_refused_connections_are_logged_at_most_once_per_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = Clock()
    cap = ConnectionCap(1, clock=clock)
    cap.admit()
    with caplog.at_level(logging.WARNING, logger="proxy.server.admission"):
        for _ in range(50):
            cap.admit()
        clock.now += LOG_EVERY
        cap.admit()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "refused 1 client connection(s): 1 open, cap 1 (max_connections)",
        "refused 50 client connection(s): 1 open, cap 1 (max_connections)",
    ]


def test_a_cap_above_the_files_limit_is_warned_about_and_zero_refused(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="proxy.server.admission"):
        ConnectionCap(default_max_connections() + 1)
    assert "run out of descriptors" in caplog.text
    with pytest.raises(ValueError, match="at least 1"):
        ConnectionCap(0)


def test_the_soft_open_files_limit_is_raised_to_the_hard_one() -> None:
    # In a child, so this process keeps its limits.
    code = (
        "import logging, resource;"
        "resource.setrlimit(resource.RLIMIT_NOFILE, (64, 128));"
        "logging.basicConfig(level=logging.INFO, format='%(message)s');"
        "from proxy.server.admission import raise_open_files_limit;"
        "print(raise_open_files_limit(), resource.getrlimit(resource.RLIMIT_NOFILE))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=30
    )
    assert done.stdout.strip() == "(64, 128) (128, 128)"
    assert "open-files limit: soft 128 (was 64), hard 128" in done.stderr


@pytest.mark.parametrize(
    ("flags", "env", "expected"),
    [
        ({}, {}, None),
        ({"max_connections": 100}, {}, 100),
        ({}, {"PAYSWITCH_MAX_CONNECTIONS": "250"}, 250),
        ({"max_connections": 7}, {"PAYSWITCH_MAX_CONNECTIONS": "250"}, 7),
        ({}, {"PAYSWITCH_MAX_CONNECTIONS": "0"}, "expected a positive number, got '0'"),
        ({}, {"PAYSWITCH_MAX_CONNECTIONS": "many"}, "expected a positive number, got 'many'"),
        ({"max_connections": -5}, {}, "expected a positive number, got -5"),
    ],
    ids=["default", "flag", "env", "flag-wins", "zero", "not-a-number", "negative"],
)
def test_the_cap_comes_from_the_flag_or_the_environment(
    flags: dict[str, object], env: dict[str, str], expected: int | str | None
) -> None:
    if isinstance(expected, str):
        with pytest.raises(ValueError, match=expected):
            from_sources(flags, env)
    else:
        assert from_sources(flags, env).max_connections == expected
