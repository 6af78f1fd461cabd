from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest

from proxy import version

REPO = Path(__file__).resolve().parents[2]


def test_the_installed_version_is_the_declared_one() -> None:
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert version.version() == declared


def test_the_first_dist_info_on_the_path_wins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "a", tmp_path / "b"
    for where, v in ((first, "9.9.9"), (second, "1.0.0")):
        meta = where / f"payswitch-{v}.dist-info" / "METADATA"
        meta.parent.mkdir(parents=True)
        meta.write_text(f"Metadata-Version: 2.1\nName: payswitch\nVersion: {v}\n\nbody\n")
    (first / "payswitch_extra-1.dist-info").mkdir()  # another distribution's, not ours
    monkeypatch.setattr(sys, "path", [str(tmp_path / "missing"), str(first), str(second)])
    assert version.version() == "9.9.9"


def test_no_dist_info_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = tmp_path / "payswitch-0.dist-info"
    broken.mkdir()
    (broken / "METADATA").write_text("Name: payswitch\n\nVersion: in the body, not a header\n")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    assert version.version() == version.UNKNOWN


def test_build_names_what_runs_the_request_path() -> None:
    import os

    expected = "native" if os.environ.get("PAYSWITCH_NATIVE") == "1" else "python"
    assert version.build() == expected
