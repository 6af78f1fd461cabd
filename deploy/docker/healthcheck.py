"""Container HEALTHCHECK: exit 0 when payswitch's admin /healthz answers 200, else 1.

Reads the admin address the way payswitch does (PAYSWITCH_ADMIN, default
127.0.0.1:9901), so the check follows the setting. Standard library only: the image has
no curl, and this must work without importing payswitch.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def admin_url(setting: str) -> str:
    host, _, port = setting.rpartition(":")
    host = host.strip("[]")
    # A wildcard listen address is reachable on loopback from inside the container.
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}/healthz"


def main() -> int:
    url = admin_url(os.environ.get("PAYSWITCH_ADMIN", "127.0.0.1:9901"))
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            ok = resp.status == 200
    except (OSError, urllib.error.URLError) as exc:
        print(f"unhealthy: {url}: {exc}", file=sys.stderr)
        return 1
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
