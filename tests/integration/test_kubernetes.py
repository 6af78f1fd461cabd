"""deploy/kubernetes as a cluster gets it: rendered by `kubectl kustomize`, validated
strictly against Kubernetes' own schemas, and checked against payswitch itself.

The rules ConfigMap must be rules/ byte for byte; the pod's settings must be accepted by
payswitch's own settings parser; every port, probe and shutdown budget must agree across
payswitch, Envoy, the Service, the PodMonitor and the NetworkPolicy, in both overlays.
"""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import kubernetes_validate
import pytest
import yaml

from proxy.config.load import build_rules
from proxy.settings import from_sources, is_loopback
from tests.kustomize import OVERLAY_NAMES, REPO, Docs, configmap, rendered

RULES_DIR = REPO / "rules"
DEPLOY = REPO / "deploy"
PROBES_PORT = 9102
# The app's own drain after SIGTERM, which the manifests' comments promise to allow for.
APP_DRAIN = 20.0
CUSTOM_KINDS = {"PodMonitor", "PrometheusRule"}  # the Prometheus Operator's CRDs

# Kubernetes versions each overlay must validate against: native sidecars need >= 1.29.
VERSIONS = {
    "native-sidecar": ("1.29.0", "1.37.0"),
    "classic-sidecar": ("1.27.0", "1.37.0"),
}
CASES = [(o, v) for o in OVERLAY_NAMES for v in VERSIONS[o]]


@pytest.mark.parametrize(("overlay", "version"), CASES, ids=[f"{o}-{v}" for o, v in CASES])
def test_manifests_validate_strictly(overlay: str, version: str) -> None:
    docs = rendered(overlay)
    assert {k: len(v) for k, v in docs.items()} == {
        "ConfigMap": 3,
        "Deployment": 1,
        "Service": 1,
        "PodDisruptionBudget": 1,
        "NetworkPolicy": 1,
        "PodMonitor": 1,
        "PrometheusRule": 1,
    }
    for kind, items in docs.items():
        if kind in CUSTOM_KINDS:
            continue
        for doc in items:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{kind} {doc['metadata']['name']} on {version}: {exc}")


def test_native_sidecars_need_kubernetes_1_29() -> None:
    """An older cluster would reject the native overlay; that is what the classic one is for."""
    (deployment,) = rendered("native-sidecar")["Deployment"]
    with pytest.raises(kubernetes_validate.ValidationError, match="restartPolicy"):
        kubernetes_validate.validate(deployment, "1.27.0", strict=True)


def rules_files() -> dict[str, str]:
    files = sorted([*RULES_DIR.glob("*.yaml"), *RULES_DIR.glob("*.yml")])
    assert files
    return {f.name: f.read_text() for f in files}


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_rules_configmap_is_rules_dir_byte_for_byte(overlay: str) -> None:
    cm = configmap(rendered(overlay), "payswitch-rules")
    # No hash suffix: the Deployment mounts it by this name and Kubernetes updates it in place.
    assert cm["metadata"]["name"] == "payswitch-rules"
    assert cm["data"] == rules_files()
    # And the whole rendered text carries them unchanged (block scalars keep every byte).
    rules = build_rules([(name, text.encode()) for name, text in cm["data"].items()])
    assert rules.routes and rules.gateways


def test_rules_kustomization_lists_every_rules_file() -> None:
    kustomization = yaml.safe_load((RULES_DIR / "Kustomization").read_text())
    (generator,) = kustomization["configMapGenerator"]
    assert sorted(generator["files"]) == sorted(rules_files())
    assert generator["options"]["disableNameSuffixHash"] is True


def test_dashboard_and_alerts_ship_as_the_files_themselves() -> None:
    docs = rendered("native-sidecar")
    board = configmap(docs, "payswitch-grafana-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard_file = DEPLOY / "grafana" / "payswitch-dashboard.json"
    assert board["data"] == {"payswitch-dashboard.json": dashboard_file.read_text()}

    (rule,) = docs["PrometheusRule"]
    alerts = DEPLOY / "prometheus" / "alerts.yaml"
    assert rule["spec"] == yaml.safe_load(alerts.read_text())
    generated = subprocess.run(
        [sys.executable, str(DEPLOY / "prometheus" / "prometheusrule.py")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    committed = (DEPLOY / "kubernetes" / "base" / "prometheusrule.yaml").read_text()
    assert committed == generated, "alerts.yaml changed: run `make manifests`"


# -- the pod ---------------------------------------------------------------------------


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {e["name"]: e["value"] for e in container.get("env", []) if "value" in e}


def port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    by_name = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
    assert port in by_name, f"{container['name']} has no port named {port}"
    return int(by_name[port])


def matches(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def dockerfile_uid() -> int:
    (user,) = re.findall(r"^USER\s+(\d+)", (REPO / "Dockerfile").read_text(), re.M)
    return int(user)


def sidecars(overlay: str, pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(payswitch, envoy), checking how each overlay places them."""
    if overlay == "native-sidecar":
        inits = pod["initContainers"]
        assert [c["name"] for c in inits] == ["payswitch", "envoy"], "payswitch starts first"
        assert all(c["restartPolicy"] == "Always" for c in inits)
        assert [c["name"] for c in pod["containers"]] == ["app"]
        assert all("lifecycle" not in c for c in inits), "native sidecars need no preStop"
        return inits[0], inits[1]
    assert "initContainers" not in pod
    containers = {c["name"]: c for c in pod["containers"]}
    assert set(containers) == {"app", "payswitch", "envoy"}
    assert all("restartPolicy" not in c for c in containers.values())
    return containers["payswitch"], containers["envoy"]


def envoy_of(docs: Docs) -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(
        configmap(docs, "payswitch-envoy")["data"]["envoy.yaml"]
    )
    return config


def envoy_ports(config: dict[str, Any]) -> dict[str, tuple[str, int]]:
    ports = {
        ln["name"]: (
            ln["address"]["socket_address"]["address"],
            ln["address"]["socket_address"]["port_value"],
        )
        for ln in config["static_resources"]["listeners"]
    }
    (cluster,) = config["static_resources"]["clusters"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    ports["upstream"] = ("127.0.0.1", endpoint["address"]["socket_address"]["port_value"])
    ports["upstream-health"] = ("127.0.0.1", endpoint["health_check_config"]["port_value"])
    return ports


def check_probes(container: dict[str, Any], port: int, *, ready: str, live: str | None) -> None:
    for probe in ("startupProbe", "readinessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == ready, (container["name"], probe)
        assert port_number(container, get["port"]) == port, (container["name"], probe)
    live_probe = container["livenessProbe"]
    if live is None:
        assert port_number(container, live_probe["tcpSocket"]["port"]) == port
    else:
        assert live_probe["httpGet"]["path"] == live
        assert port_number(container, live_probe["httpGet"]["port"]) == port
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 10, "room to load rules"


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_pod_agrees_with_payswitch_and_envoy(overlay: str) -> None:
    docs = rendered(overlay)
    (deployment,) = docs["Deployment"]
    template = deployment["spec"]["template"]
    pod = template["spec"]
    payswitch, envoy = sidecars(overlay, pod)
    app = next(c for c in pod["containers"] if c["name"] == "app")

    # payswitch's own parser accepts the pod's environment.
    env = env_of(payswitch)
    settings = from_sources({}, env)
    assert is_loopback(settings.listen[0]), "only Envoy in the pod sends payments"
    assert is_loopback(settings.admin[0]), "the admin API stays inside the pod"
    assert settings.probes is not None and not is_loopback(settings.probes[0])
    assert settings.probes[1] == PROBES_PORT
    assert settings.trusted_proxies == ("127.0.0.1/32",)
    (token,) = [e for e in payswitch["env"] if e["name"] == "PAYSWITCH_ADMIN_TOKEN"]
    assert "secretKeyRef" in token["valueFrom"], "the token comes from a Secret"

    # app -> Envoy -> payswitch: ports line up; Envoy checks payswitch's /readyz on probes.
    ports = envoy_ports(envoy_of(docs))
    ingress_host, ingress_port = ports["ingress"]
    assert is_loopback(ingress_host)
    assert env_of(app)["PAYMENTS_URL"] == f"http://127.0.0.1:{ingress_port}"
    assert ports["upstream"][1] == settings.listen[1]
    assert ports["upstream-health"][1] == settings.probes[1]
    health_port = ports["health"][1]

    check_probes(payswitch, PROBES_PORT, ready="/readyz", live="/healthz")
    check_probes(envoy, health_port, ready="/ready", live=None)
    assert {p["containerPort"] for p in payswitch["ports"]} == {PROBES_PORT}
    assert {p["containerPort"] for p in envoy["ports"]} == {health_port}

    # The rules: the whole ConfigMap as the rules directory (a subPath mount never updates).
    (mount,) = [m for m in payswitch["volumeMounts"] if m["mountPath"] == settings.rules[0]]
    assert "subPath" not in mount and mount["readOnly"] is True
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes[mount["name"]]["configMap"]["name"] == "payswitch-rules"
    (envoy_mount,) = envoy["volumeMounts"]
    envoy_cm = configmap(docs, "payswitch-envoy")["metadata"]["name"]
    assert volumes[envoy_mount["name"]]["configMap"]["name"] == envoy_cm
    assert f"{envoy_mount['mountPath']}/envoy.yaml" in envoy["args"]

    # Locked down: no API token, non-root, read-only, no capabilities.
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert payswitch["securityContext"]["runAsUser"] == dockerfile_uid()
    for c in (payswitch, envoy):
        ctx = c["securityContext"]
        assert ctx["readOnlyRootFilesystem"] is True and ctx["allowPrivilegeEscalation"] is False
        assert ctx["capabilities"]["drop"] == ["ALL"]

    # Shutdown fits the grace period: the app's drain, then payswitch's grace and deadline.
    drain = settings.shutdown_grace + settings.shutdown_deadline
    if overlay == "classic-sidecar":
        for c in (payswitch, envoy):
            command = c["lifecycle"]["preStop"]["exec"]["command"]
            assert command[0] == "sleep" and float(command[1]) >= APP_DRAIN
        drain += float(payswitch["lifecycle"]["preStop"]["exec"]["command"][1])
    else:
        drain += APP_DRAIN
    assert drain < pod["terminationGracePeriodSeconds"]


@pytest.mark.parametrize("overlay", OVERLAY_NAMES)
def test_only_the_app_and_the_probes_are_reachable(overlay: str) -> None:
    docs = rendered(overlay)
    (deployment,) = docs["Deployment"]
    template = deployment["spec"]["template"]
    labels = template["metadata"]["labels"]
    pod = template["spec"]
    every = [*pod.get("initContainers", []), *pod["containers"]]
    named = {p["name"]: p["containerPort"] for c in every for p in c.get("ports", [])}

    (service,) = docs["Service"]
    assert matches(service["spec"]["selector"], labels)
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"], "only the app"

    (monitor,) = docs["PodMonitor"]
    assert matches(monitor["spec"]["selector"]["matchLabels"], labels)
    (endpoint,) = monitor["spec"]["podMetricsEndpoints"]
    assert endpoint["path"] == "/metrics" and named[endpoint["port"]] == PROBES_PORT

    (policy,) = docs["NetworkPolicy"]
    assert matches(policy["spec"]["podSelector"]["matchLabels"], labels)
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert open_ports == {"http", "probes"}
    probes_rule = next(r for r in policy["spec"]["ingress"] if r["ports"][0]["port"] == "probes")
    assert probes_rule["from"], "metrics only from Prometheus"
    assert all(port in named for port in open_ports)

    (pdb,) = docs["PodDisruptionBudget"]
    assert matches(pdb["spec"]["selector"]["matchLabels"], labels)
