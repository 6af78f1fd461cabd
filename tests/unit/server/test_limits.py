"""Refusals name a low-cardinality reason for the metric."""

from __future__ import annotations

import pytest

from proxy.server.limits import Refusal


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        (400, "malformed"),
        (408, "timeout"),
        (414, "too_large"),
        (431, "too_large"),
        (417, "unsupported"),
        (501, "unsupported"),
        (505, "unsupported"),
        (503, "pipeline_full"),
        (418, "other"),
    ],
    ids=["400", "408", "414", "431", "417", "501", "505", "503", "unknown"],
)
def test_refusal_reasons(status: int, reason: str) -> None:
    refusal = Refusal(status, "why")
    assert (refusal.reason, refusal.detail, str(refusal)) == (reason, "why", "why")
