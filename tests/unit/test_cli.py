"""`payswitch validate`: exit codes and `file:line: pointer: message` output."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        check=False,
    )


def test_validate_example_rules_exits_zero() -> None:
    result = run("validate", "rules")
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok: 2 file(s)")


def test_validate_reports_file_and_line_for_a_broken_file(tmp_path: Path) -> None:
    good = (REPO / "rules" / "gateways.yaml").read_text()
    (tmp_path / "gateways.yaml").write_text(good)
    broken = (
        (REPO / "rules" / "routes.yaml").read_text().replace("per_try: 500ms", "per_try: soon", 1)
    )
    (tmp_path / "routes.yaml").write_text(broken)
    line = next(i for i, text in enumerate(broken.splitlines(), 1) if "per_try: soon" in text)
    result = run("validate", str(tmp_path))
    assert result.returncode == 1
    first = result.stderr.splitlines()[0]
    assert first.startswith(f"{tmp_path / 'routes.yaml'}:{line}: /routes/0/timeouts/per_try: ")
    assert "1 problem(s) found" in result.stderr


def test_validate_accepts_single_files() -> None:
    result = run("validate", "rules/gateways.yaml", "rules/routes.yaml")
    assert result.returncode == 0, result.stderr


def test_run_refuses_invalid_rules_with_exit_1(tmp_path: Path) -> None:
    (tmp_path / "x.yaml").write_text("routes: nope\n")
    result = run(
        "run",
        "--rules",
        str(tmp_path),
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--no-watch",
    )
    assert result.returncode == 1
    assert "x.yaml:1: /routes:" in result.stderr


def test_validate_reads_secrets_unless_told_to_skip_them(tmp_path: Path) -> None:
    (tmp_path / "rules.yaml").write_text(
        "gateways:\n"
        "  g:\n"
        "    url: http://127.0.0.1:9101\n"
        "    region: eu\n"
        "    headers: {Authorization: {value_from: {file: /nonexistent/secret}}}\n"
        "routes:\n"
        "  - {name: r, match: {path: /}, gateways: [g]}\n"
    )
    read = run("validate", str(tmp_path))
    assert read.returncode == 1
    assert read.stderr.splitlines()[0] == (
        f"{tmp_path / 'rules.yaml'}:5: /gateways/g/headers/Authorization/value_from: "
        "header `Authorization`: cannot read /nonexistent/secret: No such file or directory"
    )
    skipped = run("validate", "--skip-secrets", str(tmp_path))
    assert skipped.returncode == 0, skipped.stderr


def test_version() -> None:
    result = run("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("payswitch ")


BAD_WORKERS = {
    "zero": "0",
    "a word": "two",
    "too many": "65",
}


@pytest.mark.parametrize("value", BAD_WORKERS.values(), ids=BAD_WORKERS)
def test_run_refuses_a_bad_workers_count_with_exit_2(value: str) -> None:
    result = run("run", "--workers", value, "--rules", "rules")
    assert result.returncode == 2, result.stderr
    assert "workers: expected a number from 1 to 64" in result.stderr
