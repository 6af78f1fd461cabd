"""nginx instances of the bench: the upstream every target forwards to, and the nginx anchor.

Owns: the two nginx configurations and the command line that runs one from a private
prefix (config, pid, temp files and error log all in a temp dir; no access log).
Must not: start processes itself or touch the system nginx and its /etc config.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

# What the upstream answers for every method and path, GET /health included.
UPSTREAM_BODY = '{"id":"pay_123","status":"succeeded"}'

# nginx closes a keep-alive connection after 1000 requests by default; wrk would then
# count reconnects against whoever is measured. The Python targets keep connections open
# indefinitely, so nginx is told to do the same on both sides.
_KEEPALIVE_REQUESTS = 1_000_000


def binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def _main(prefix: Path) -> str:
    # Without `user`, an nginx started as root runs its worker as nobody, which cannot
    # write the temp dirs below.
    user = "user root;\n" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return (
        f"{user}worker_processes 1;\n"
        "daemon off;\n"
        f"pid {prefix / 'nginx.pid'};\n"
        f"error_log {prefix / 'error.log'} warn;\n"
        "events { worker_connections 4096; }\n"
        "http {\n"
        "    access_log off;\n"
        f"    keepalive_requests {_KEEPALIVE_REQUESTS};\n"
        f"{temp}\n"
    )


def upstream_conf(prefix: Path, port: int) -> str:
    return (
        _main(prefix) + "    default_type application/json;\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        f"        location / {{ return 200 '{UPSTREAM_BODY}'; }}\n"
        "    }\n"
        "}\n"
    )


def proxy_conf(prefix: Path, port: int, upstream_port: int) -> str:
    return (
        _main(prefix) + "    upstream payments {\n"
        f"        server 127.0.0.1:{upstream_port};\n"
        "        keepalive 64;\n"
        f"        keepalive_requests {_KEEPALIVE_REQUESTS};\n"
        "    }\n"
        "    server {\n"
        f"        listen 127.0.0.1:{port};\n"
        "        location / {\n"
        "            proxy_pass http://payments;\n"
        "            proxy_http_version 1.1;\n"
        '            proxy_set_header Connection "";\n'
        "        }\n"
        "    }\n"
        "}\n"
    )


def prepare(prefix: Path, conf: str) -> list[str]:
    """Write `conf` under `prefix`; return the argv (after the binary) that runs it."""
    prefix.mkdir(parents=True, exist_ok=True)
    path = prefix / "nginx.conf"
    path.write_text(conf, encoding="utf-8")
    # -e: the error log before the config is read, else nginx tries /var/log/nginx.
    return ["-p", str(prefix), "-c", str(path), "-e", str(prefix / "error.log")]
