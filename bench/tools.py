"""The programs the bench needs from the system, installed through apt when missing.

Owns: finding nginx, wrk, hey and taskset, installing nginx, wrk and hey with apt-get, and checking
that the machine has the two cores the method pins to.
Must not: install anything else, or carry on without a tool: a bench that silently skips
a target is worse than one that stops.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Sequence

from bench import hey, nginx, wrk

# Tried in order until both programs are found; Debian/Ubuntu ship nginx-light, others
# only nginx.
INSTALLS: tuple[tuple[str, ...], ...] = (
    ("apt-get", "install", "-y", "nginx-light", "wrk", "hey"),
    ("apt-get", "update"),
    ("apt-get", "install", "-y", "nginx-light", "wrk", "hey"),
    ("apt-get", "install", "-y", "nginx", "wrk", "hey"),
)


class ToolError(SystemExit):
    """A required tool is missing and could not be installed."""


def missing() -> list[str]:
    found = {"nginx": nginx.binary(), "wrk": wrk.binary(), "hey": hey.binary()}
    return [name for name, path in found.items() if path is None]


def apt(argv: Sequence[str]) -> int:
    """Run one apt-get command, through `sudo -n` when not root."""
    if shutil.which("apt-get") is None:
        raise ToolError(f"bench: {', '.join(missing())} missing and apt-get unavailable")
    prefix: list[str] = []
    if os.geteuid() != 0:
        if shutil.which("sudo") is None:
            raise ToolError("bench: nginx/wrk missing; not root and no sudo to install them")
        prefix = ["sudo", "-n"]
    full = [*prefix, *argv]
    print(f"bench: {' '.join(full)}", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    return subprocess.run(full, env=env, timeout=900, check=False).returncode


def ensure(run: Callable[[Sequence[str]], int] = apt) -> None:
    """Install nginx and wrk if absent; raise ToolError if they still are."""
    if shutil.which("taskset") is None:
        raise ToolError("bench: taskset (util-linux) is required to pin processes to cores")
    cores = os.sched_getaffinity(0)
    if not {0, 1} <= cores:
        raise ToolError(f"bench: needs cores 0 and 1, this process may use {sorted(cores)}")
    if not missing():
        return
    for argv in INSTALLS:
        run(argv)
        if argv[1] == "install" and not missing():
            return
    raise ToolError(f"bench: could not install {', '.join(missing())} with apt-get")
