"""Silence: requests waiting on a gateway that answers none of them."""

from __future__ import annotations

import pytest

from proxy.upstream.silence import MAX_TRACKED, MIN_OVERDUE, Silence

USUAL = 0.02  # the gateway usually answers in 20 ms: overdue after 100 ms


def waiting(*starts: float) -> Silence:
    s = Silence()
    for t in starts:
        s.started(t)
    return s


@pytest.mark.parametrize(
    ("starts", "now", "last_answer", "usual", "silent"),
    [
        ((0.0, 0.05, 0.1), 0.11, -1.0, USUAL, True),
        ((0.0, 0.05, 0.1), 0.09, -1.0, USUAL, False),  # the oldest not overdue yet
        ((0.0, 0.05), 0.5, -1.0, USUAL, False),  # two waiting: could be two slow ones
        ((0.0, 0.05, 0.1), 0.5, 0.01, USUAL, False),  # it answered since the oldest left
        ((0.0, 0.05, 0.1), 0.5, -1.0, None, False),  # its usual latency is not known yet
        ((0.0, 0.01, 0.02), MIN_OVERDUE - 0.001, -1.0, 0.001, False),  # floor on overdue
    ],
    ids=["silent", "not-overdue", "too-few", "answered", "no-baseline", "overdue-floor"],
)
def test_verdict(
    starts: tuple[float, ...], now: float, last_answer: float, usual: float | None, silent: bool
) -> None:
    assert waiting(*starts).silent(now, last_answer, usual) is silent


def test_finishes_remove_the_start_they_report() -> None:
    s = waiting(0.0, 0.05, 0.1)
    s.finished(0.05 + 1e-6)  # callers' latency arithmetic leaves float noise
    assert len(s) == 2
    s.finished(5.0)  # no such request: nothing removed
    assert len(s) == 2
    s.finished(0.0)
    s.finished(0.1)
    assert len(s) == 0


def test_out_of_order_starts_stay_sorted() -> None:
    s = waiting(0.1, 0.0, 0.05)
    assert not s.silent(0.2, 0.01, USUAL)  # the oldest (0.0) is before the last answer
    s.finished(0.0)
    assert s.silent(0.25, 0.01, USUAL) is False  # two left
    s.started(0.06)
    assert s.silent(0.2, 0.01, USUAL)


def test_unreported_finishes_are_bounded_and_only_turn_the_verdict_off() -> None:
    s = waiting(*(i * 1e-3 for i in range(MAX_TRACKED + 5)))
    assert len(s) == MAX_TRACKED
    # Old starts left behind: the gateway answered since the oldest, so never silent.
    assert not s.silent(100.0, 50.0, USUAL)
