"""The native build: what it compiles, and which build a pass of the suite really runs.

`make test` runs the suite twice: on the sources, then with the native build
(deploy/native/build.py) first on PYTHONPATH and PAYSWITCH_NATIVE=1. Each pass checks
here that it exercises what it claims to, so a stale extension in the source tree or a
missing native build cannot pass for the other.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "native_build", REPO / "deploy" / "native" / "build.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build()
NATIVE = os.environ.get("PAYSWITCH_NATIVE") == "1"


def module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def test_every_listed_module_exists_and_none_twice() -> None:
    assert len(set(build.MODULES)) == len(build.MODULES)
    for path in build.MODULES:
        assert (REPO / path).is_file(), path


def test_no_compiled_module_binds_one_name_in_except_clauses_of_different_types() -> None:
    assert build.pitfalls([REPO / m for m in build.MODULES]) == []


@pytest.mark.parametrize(
    ("source", "said"),
    [
        (
            "def f() -> None:\n"
            "    try:\n        pass\n"
            "    except ValueError as e:\n        print(e)\n"
            "    except KeyError as e:\n        print(e)\n",
            ":1 f: `e` bound by `except KeyError / ValueError`",
        ),
        (
            "import os\n"
            "def f(view: memoryview, n: int) -> memoryview:\n"
            "    ok = view[n:-1]\n"
            "    return view[os.write(1, view) :]\n",
            ":4 `view[os.write(1, view):]`: a slice bound that calls",
        ),
    ],
    ids=["except-names", "slice-bound-calls"],
)
def test_the_pitfall_check_finds_what_it_is_for(tmp_path: Path, source: str, said: str) -> None:
    src = tmp_path / "probe.py"
    src.write_text(source, encoding="utf-8")
    [found] = build.pitfalls([src])
    assert f"{src}{said}" in found


def test_this_pass_runs_the_build_it_claims_to() -> None:
    for path in build.MODULES:
        name = module_name(path)
        spec = importlib.util.find_spec(name)
        assert spec is not None and spec.origin is not None, name
        if NATIVE:
            assert spec.origin.endswith(".so"), f"{name} is not compiled: {spec.origin}"
        else:
            assert spec.origin == str(REPO / path), f"{name} comes from {spec.origin}"
    imported = importlib.import_module("proxy.handler").__file__
    assert imported is not None
    assert imported.endswith(".so") if NATIVE else imported.endswith(".py")
