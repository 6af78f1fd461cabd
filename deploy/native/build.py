"""Compile payswitch's request path to C with mypyc: the native build the image ships.

    .venv/bin/python deploy/native/build.py [--out .build/native] [--check]

The modules below run once or more per request; mypyc turns each into a C extension
(native classes, direct calls, unboxed attributes) from the same typed source `mypy
--strict` checks, so behaviour stays the source's: every other module stays Python. The
result is a directory holding a complete `proxy` package (the compiled extensions beside
all the sources) and mypyc's shared runtime library; put it first on PYTHONPATH:

    PYTHONPATH=.build/native .venv/bin/payswitch run --rules rules

It is rebuilt only when a source under proxy/ or this list changes (a stamp file holds
their digest), and never written into the source tree: an extension next to its `.py`
would hide every later edit of that file.

Owns: the list of compiled modules, the staging copy, the compiler's settings.
Must not: leave a half-built directory where a good one was (built aside, then renamed).
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEFAULT_OUT = ROOT / ".build" / "native"

#: The request path, in the order a request meets it. A module here must not be
#: monkeypatched at run time, and a class here that Python code subclasses needs
#: `@mypyc_attr(allow_interpreted_subclasses=True)`.
MODULES = (
    "proxy/server/head.py",
    "proxy/server/connection.py",
    "proxy/server/cycle.py",
    "proxy/server/wire.py",
    "proxy/server/admission.py",
    "proxy/server/deadlines.py",
    "proxy/http.py",
    "proxy/headers.py",
    "proxy/handler.py",
    "proxy/outbound.py",
    "proxy/retry.py",
    "proxy/retry_policy.py",
    "proxy/attempt.py",
    "proxy/exchange.py",
    "proxy/forward.py",
    "proxy/aio.py",
    "proxy/ids.py",
    "proxy/upstream/client.py",
    "proxy/upstream/connection.py",
    "proxy/upstream/response.py",
    "proxy/upstream/phase.py",
    "proxy/upstream/state.py",
    "proxy/upstream/balancer.py",
    "proxy/upstream/health.py",
    "proxy/upstream/degradation.py",
    "proxy/upstream/outlier.py",
    "proxy/upstream/limits.py",
    "proxy/upstream/silence.py",
    "proxy/windows.py",
    "proxy/clock.py",
    "proxy/routing.py",
    "proxy/ledger.py",
    "proxy/metrics.py",
    "proxy/payments.py",
    "proxy/events.py",
    "proxy/accesslog.py",
    "proxy/idempotency/transactions.py",
)

STAMP = ".payswitch-native"


def pitfalls(paths: list[Path]) -> list[str]:
    """Source that mypy accepts and mypyc compiles differently, in the modules given.

    - `except A as e:` and `except B as e:` in one function. mypy checks each clause
      alone; mypyc gives `e` the first clause's type, so catching B raises TypeError
      instead of running the handler (a client leaving mid-body answered 500).
    - A call (or await, or `:=`) in a slice bound: slicing anything but a list, str or
      bytes typed as such evaluates each bound twice, so `view[os.write(fd, view):]`
      wrote every batch twice. Give the bound a name first.
    """
    found = []
    for path in paths:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
        where = path.relative_to(ROOT) if path.is_relative_to(ROOT) else path
        for node in ast.walk(tree):
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Slice):
                bounds = (node.slice.lower, node.slice.upper, node.slice.step)
                if any(_acts(b) for b in bounds if b is not None):
                    found.append(
                        f"{where}:{node.lineno} `{ast.unparse(node)}`: a slice bound that"
                        " calls is evaluated twice when compiled: name it first"
                    )
        for fn in ast.walk(tree):
            if not isinstance(fn, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            bound: dict[str, set[str]] = {}
            for node in ast.walk(fn):
                if isinstance(node, ast.ExceptHandler) and node.name:
                    what = ast.unparse(node.type) if node.type else "BaseException"
                    bound.setdefault(node.name, set()).add(what)
            for name, types in bound.items():
                if len(types) > 1:
                    found.append(
                        f"{where}:{fn.lineno} {fn.name}: `{name}` bound by"
                        f" `except {' / '.join(sorted(types))}`: give each clause its own name"
                    )
    return found


def _acts(expr: ast.expr) -> bool:
    """Does evaluating `expr` call, await or assign anything?"""
    return any(isinstance(n, ast.Call | ast.Await | ast.NamedExpr) for n in ast.walk(expr))


def digest() -> str:
    h = hashlib.sha256()
    h.update(Path(__file__).read_bytes())
    h.update(sys.version.encode())
    for path in sorted([*(ROOT / "proxy").rglob("*"), *(ROOT / "schemas").rglob("*")]):
        if path.is_file() and "__pycache__" not in path.parts:
            h.update(str(path.relative_to(ROOT)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def up_to_date(out: Path, want: str) -> bool:
    try:
        return (out / STAMP).read_text(encoding="utf-8").strip() == want
    except OSError:
        return False


def toolchain_missing() -> str | None:
    """What the compile needs and this machine lacks, said so it can be installed."""
    include = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not include.is_file():
        return f"Python's headers ({include}; Debian: python3-dev)"
    compiler = os.environ.get("CC", "gcc").split()[0]
    if shutil.which(compiler) is None:
        return f"a C compiler ({compiler}; Debian: gcc libc6-dev)"
    return None


def build(out: Path) -> None:
    want = digest()
    if up_to_date(out, want):
        print(f"native build up to date: {out}", file=sys.stderr)
        return
    missing = toolchain_missing()
    if missing is not None:
        raise SystemExit(f"the native build needs {missing}; .ci/services installs it as root")
    problems = pitfalls([ROOT / m for m in MODULES])
    if problems:
        raise SystemExit("not compiled:\n" + "\n".join(problems))
    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=".native-", dir=out.parent))
    try:
        shutil.copytree(
            ROOT / "proxy", stage / "proxy", ignore=shutil.ignore_patterns("__pycache__")
        )
        # Where `proxy.config.load.schema_dir` looks in an installed package.
        shutil.copytree(ROOT / "schemas", stage / "proxy" / "schemas")
        # mypyc type-checks what it compiles with the project's own (strict) settings.
        shutil.copy2(ROOT / "pyproject.toml", stage / "pyproject.toml")
        env = dict(os.environ, MYPYC_OPT_LEVEL="3", MYPYC_DEBUG_LEVEL="0")
        print(f"compiling {len(MODULES)} modules with mypyc (about a minute)", file=sys.stderr)
        done = subprocess.run(
            [sys.executable, "-m", "mypyc", *MODULES],
            cwd=stage,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            check=False,
        )
        if done.returncode != 0:
            tail = "\n".join(done.stdout.splitlines()[-40:])
            raise SystemExit(f"mypyc failed (exit {done.returncode}):\n{tail}")
        shutil.rmtree(stage / "build", ignore_errors=True)
        (stage / "pyproject.toml").unlink()
        missing = [m for m in MODULES if not list(stage.glob(m.removesuffix(".py") + ".*.so"))]
        if missing:
            raise SystemExit(f"mypyc left no extension for: {', '.join(missing)}")
        (stage / STAMP).write_text(want + "\n", encoding="utf-8")
        if out.exists():
            shutil.rmtree(out)
        stage.rename(out)
        stage = out
        print(f"native build ready: {out}", file=sys.stderr)
    finally:
        if stage != out:
            shutil.rmtree(stage, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 when the build is missing or stale"
    )
    args = parser.parse_args()
    if args.check:
        raise SystemExit(0 if up_to_date(args.out, digest()) else 1)
    build(args.out)


if __name__ == "__main__":
    main()
