"""The installed payswitch's version and which build of it runs.

Owns: reading the version from the installed distribution's METADATA, found on sys.path
as `importlib.metadata` finds it, without importing `importlib.metadata` (its email
parser, zipfile and csv add ~1.9 MiB to an idle sidecar that only needs one line); and
whether the request path is the native build (deploy/native/build.py).
Must not: import anything beyond os and sys.
"""

from __future__ import annotations

import os
import sys

DIST = "payswitch"
UNKNOWN = "unknown (not installed)"


def version() -> str:
    """The version of the first `payswitch-*.dist-info` on sys.path; UNKNOWN without one."""
    prefix = f"{DIST}-"
    for entry in sys.path:
        try:
            names = sorted(os.listdir(entry or "."))
        except OSError:
            continue
        for name in names:
            if not (name.startswith(prefix) and name.endswith(".dist-info")):
                continue
            found = _metadata_version(os.path.join(entry or ".", name, "METADATA"))
            if found is not None:
                return found
    return UNKNOWN


def _metadata_version(path: str) -> str | None:
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    return None  # the headers end at the first blank line
                if line.startswith("Version:"):
                    return line.split(":", 1)[1].strip() or None
    except OSError:
        return None
    return None


def build() -> str:
    """ "native" when the request path runs compiled (the native build), else "python"."""
    handler = sys.modules.get("proxy.handler")
    if handler is None:
        import proxy.handler as handler
    origin = getattr(handler, "__file__", None) or ""
    return "python" if origin.endswith(".py") else "native"
