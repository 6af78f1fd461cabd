"""The README tells the truth about what the code reads."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
VARIABLE = re.compile(r"\bPAYSWITCH_[A-Z][A-Z0-9_]*\b")


def _read_by_code() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "proxy").rglob("*.py"):
        found |= set(VARIABLE.findall(path.read_text(encoding="utf-8")))
    return found


def test_the_scan_finds_the_variables_it_should() -> None:
    # Guards the scan itself: a broken pattern would make the next test pass vacuously.
    assert {"PAYSWITCH_RULES", "PAYSWITCH_SCHEMAS", "PAYSWITCH_WEBHOOK_FORMAT"} <= _read_by_code()


def test_every_payswitch_variable_the_code_reads_is_in_the_readme() -> None:
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    missing = sorted(v for v in _read_by_code() if v not in set(VARIABLE.findall(readme)))
    assert not missing, f"PAYSWITCH_* variables read by the code but not in README.md: {missing}"
