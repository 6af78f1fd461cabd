"""Rendering deploy/kubernetes the way an operator does: `kubectl kustomize OVERLAY`.

Shared by the Kubernetes and Envoy tests, so both check the manifests a cluster would get
(the Envoy test runs the Envoy config taken out of the rendered ConfigMap).
"""

from __future__ import annotations

import functools
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
OVERLAYS = REPO / "deploy" / "kubernetes" / "overlays"
OVERLAY_NAMES = ("native-sidecar", "classic-sidecar")

Docs = dict[str, list[dict[str, Any]]]


def kustomize_command(overlay: str) -> list[str]:
    """`kubectl kustomize deploy/kubernetes/overlays/NAME`, or a standalone kustomize
    (.ci/services installs one with `go install` where kubectl is missing)."""
    target = f"deploy/kubernetes/overlays/{overlay}"
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize", target]
    for found in (shutil.which("kustomize"), REPO / ".venv" / "bin" / "kustomize"):
        if found and Path(found).is_file():
            return [str(found), "build", target]
    pytest.fail("neither kubectl nor kustomize found; `make services` installs kustomize")


@functools.cache
def rendered_text(overlay: str) -> str:
    done = subprocess.run(
        kustomize_command(overlay), cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, f"rendering {overlay} failed:\n{done.stderr}"
    return done.stdout


def rendered(overlay: str) -> Docs:
    """The overlay's manifests by kind, freshly parsed (callers may change them)."""
    docs: Docs = {}
    for doc in yaml.safe_load_all(rendered_text(overlay)):
        if doc is not None:
            docs.setdefault(doc["kind"], []).append(doc)
    return docs


def configmap(docs: Docs, prefix: str) -> dict[str, Any]:
    """The one ConfigMap whose name is `prefix` (or `prefix-<hash>`)."""
    found = [
        cm
        for cm in docs["ConfigMap"]
        if cm["metadata"]["name"] == prefix or cm["metadata"]["name"].startswith(prefix + "-")
    ]
    assert len(found) == 1, [cm["metadata"]["name"] for cm in docs["ConfigMap"]]
    return found[0]


def rendered_envoy_config(overlay: str = "native-sidecar") -> str:
    """deploy/envoy/envoy.yaml as the pod gets it, out of the rendered ConfigMap."""
    text: str = configmap(rendered(overlay), "payswitch-envoy")["data"]["envoy.yaml"]
    return text
