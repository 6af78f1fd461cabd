"""A plain (non-editable) install of the built wheel validates rules on its own.

The wheel is built from this tree, installed into a fresh virtualenv, and run from a
directory outside the source tree, so nothing can be read from the checkout: the schemas
must come from inside the package. Third-party dependencies are lent from the test's own
environment through a `.pth` line (no package index is needed); payswitch itself is not
importable from there, since it is installed in editable mode, which a `.pth` line does not
activate.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PIP = (sys.executable, "-m", "pip")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [*PIP, "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    [built] = out.glob("payswitch-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    subprocess.run(
        [*PIP, "--python", str(python), "install", "-q", "--no-deps", "--no-index", str(wheel)],
        check=True,
        capture_output=True,
        timeout=180,
    )
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(site) / "lent-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    yield venv
    shutil.rmtree(venv, ignore_errors=True)


def run(venv: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv / "bin" / "payswitch"), *args],
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "HOME": str(cwd)},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_wheel_carries_the_schemas_byte_for_byte(wheel: Path) -> None:
    sources = sorted((REPO / "schemas").glob("*.json"))
    assert sources
    with zipfile.ZipFile(wheel) as zf:
        packaged = {n for n in zf.namelist() if n.startswith("proxy/schemas/")}
        assert packaged == {f"proxy/schemas/{s.name}" for s in sources}
        for source in sources:
            assert zf.read(f"proxy/schemas/{source.name}") == source.read_bytes(), source.name


def test_installed_payswitch_is_the_wheel_not_the_checkout(installed: Path, tmp_path: Path) -> None:
    where = subprocess.run(
        [str(installed / "bin" / "python"), "-c", "import proxy; print(proxy.__file__)"],
        cwd=tmp_path,
        # The suite's second pass puts the native build first on PYTHONPATH; this is
        # about what the wheel installs.
        env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert where.startswith(str(installed)), where
    version = run(installed, "--version", cwd=tmp_path)
    declared = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert (version.returncode, version.stdout.strip()) == (0, f"payswitch {declared}")


def test_installed_payswitch_validates_rules(installed: Path, tmp_path: Path) -> None:
    rules = tmp_path / "rules"
    shutil.copytree(REPO / "rules", rules)
    good = run(installed, "validate", "rules", cwd=tmp_path)
    assert good.returncode == 0, good.stderr
    assert good.stdout.startswith("ok: 2 file(s)")

    routes = rules / "routes.yaml"
    text = routes.read_text().replace("timeouts: {per_try: 500ms", "timeout: {per_try: 500ms", 1)
    routes.write_text(text)
    line = next(i for i, t in enumerate(text.splitlines(), 1) if "timeout: {per_try" in t)
    bad = run(installed, "validate", "rules", cwd=tmp_path)
    assert bad.returncode == 1
    assert bad.stderr.splitlines()[0] == (
        f"rules/routes.yaml:{line}: /routes/0/timeout: "
        "unknown key `timeout`; did you mean `timeouts`?"
    )


def test_pre_commit_hook_validates_the_example_rules() -> None:
    import yaml

    [hook] = yaml.safe_load((REPO / ".pre-commit-hooks.yaml").read_text())
    assert hook["id"] == "payswitch-validate" and hook["pass_filenames"] is False
    command, _, sub = hook["entry"].partition(" ")
    assert command == "payswitch"
    done = subprocess.run(
        [sys.executable, "-m", "proxy", sub, *hook["args"]],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
