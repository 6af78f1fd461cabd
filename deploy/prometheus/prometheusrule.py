"""Print alerts.yaml wrapped as a Prometheus Operator PrometheusRule.

alerts.yaml stays the one source (promtool checks and unit-tests it as it is); `make
manifests` writes this script's output to deploy/kubernetes/base/prometheusrule.yaml, and a
test fails while the committed file differs from it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
HEADER = """\
# Generated from deploy/prometheus/alerts.yaml by `make manifests`: edit that file, not
# this one (a test fails while the two differ). Needs the Prometheus Operator's CRDs.
"""


def render(alerts: str) -> str:
    rule = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "payswitch",
            "labels": {"app.kubernetes.io/name": "payments-api", "role": "alert-rules"},
        },
        "spec": yaml.safe_load(alerts),
    }
    return HEADER + yaml.safe_dump(rule, sort_keys=False, width=100, allow_unicode=True)


if __name__ == "__main__":
    sys.stdout.write(render((HERE / "alerts.yaml").read_text()))
