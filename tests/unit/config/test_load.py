"""The rules loader: every problem is reported with file, line and JSON pointer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from proxy.config.load import ConfigError, load_rules

REPO = Path(__file__).resolve().parents[3]

GOOD_GATEWAYS = """\
gateways:
  stripe-eu: {url: "http://127.0.0.1:9101", region: eu, weight: 3, provider: stripe}
  adyen-us:  {url: "http://127.0.0.1:9103", region: us}
"""
GOOD_ROUTES = """\
routes:
  - name: deposits
    match: {path_prefix: /v1/deposits, methods: [POST]}
    region: {header: X-Region, default: eu, fallback: {eu: [us], us: [eu]}}
    gateways: [stripe-eu, adyen-us]
    timeouts: {per_try: 500ms, total: 3s}
    retry: {attempts: 3, on: [connect-failure, timeout, 502, 503, 504], after_ambiguous: any-gateway}
"""


def write(tmp_path: Path, **files: str) -> Path:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    return tmp_path


def test_example_rules_load() -> None:
    rules = load_rules([REPO / "rules"])
    assert len(rules.gateways) >= 4
    assert len({g.provider for g in rules.gateways.values()}) >= 2
    assert len({g.region for g in rules.gateways.values()}) >= 3
    assert {"deposits", "withdrawals"} <= {r.name for r in rules.routes}
    for f in (REPO / "rules").glob("*.yaml"):
        assert f.read_text().startswith(
            "# yaml-language-server: $schema=../schemas/rules.schema.json"
        )


def test_issue_shape_loads_with_defaults(tmp_path: Path) -> None:
    rules = load_rules([write(tmp_path, **{"a.yaml": GOOD_GATEWAYS, "b.yaml": GOOD_ROUTES})])
    us = rules.gateways["adyen-us"]
    assert (us.weight, us.provider, us.port, us.host) == (1, "adyen-us", 9103, "127.0.0.1")
    route = rules.routes[0]
    assert route.timeouts.per_try == 0.5
    assert route.timeouts.total == 3.0
    assert route.retry.on_timeout and not route.retry.on_reset
    assert route.retry.on_statuses == frozenset({502, 503, 504})
    assert route.retry.after_ambiguous == "any-gateway"
    assert route.max_body == 1024 * 1024
    assert route.region.fallback["eu"] == ("us",)


@pytest.mark.parametrize(
    ("files", "where", "line", "pointer", "words"),
    [
        ({"a.yaml": "gateways:\n  g: {url: x\n"}, "a.yaml", 3, "", "invalid YAML"),
        (
            {
                "a.yaml": GOOD_GATEWAYS.replace("region: us", "region: us, wieght: 2"),
                "b.yaml": GOOD_ROUTES,
            },
            "a.yaml",
            3,
            "/gateways/adyen-us",
            "unknown field(s) 'wieght'",
        ),
        (
            {
                "a.yaml": GOOD_GATEWAYS,
                "b.yaml": GOOD_ROUTES.replace("per_try: 500ms", "per_try: fast"),
            },
            "b.yaml",
            6,
            "/routes/0/timeouts/per_try",
            "does not match",
        ),
        (
            {
                "a.yaml": GOOD_GATEWAYS,
                "b.yaml": GOOD_ROUTES.replace("[stripe-eu, adyen-us]", "[stripe-eu, adyen-uss]"),
            },
            "b.yaml",
            5,
            "/routes/0/gateways/1",
            "unknown gateway 'adyen-uss'",
        ),
        (
            {
                "a.yaml": GOOD_GATEWAYS,
                "b.yaml": GOOD_ROUTES.replace("default: eu", "default: apac"),
            },
            "b.yaml",
            4,
            "/routes/0/region/default",
            "region 'apac'",
        ),
        (
            {
                "a.yaml": GOOD_GATEWAYS,
                "b.yaml": GOOD_ROUTES.replace(
                    "per_try: 500ms, total: 3s", "per_try: 5s, total: 3s"
                ),
            },
            "b.yaml",
            6,
            "/routes/0/timeouts/per_try",
            "must not exceed total",
        ),
        (
            {
                "a.yaml": GOOD_GATEWAYS,
                "b.yaml": GOOD_ROUTES,
                "c.yaml": GOOD_GATEWAYS.replace("adyen-us", "other"),
            },
            "c.yaml",
            2,
            "/gateways/stripe-eu",
            "already defined at",
        ),
        (
            {
                "a.yaml": GOOD_GATEWAYS,
                "b.yaml": GOOD_ROUTES.replace("weight", "x") + GOOD_ROUTES.replace("routes:\n", ""),
            },
            "b.yaml",
            8,
            "/routes/1/name",
            "route 'deposits' is already defined",
        ),
        ({"a.yaml": "- just\n- a list\n"}, "a.yaml", 1, "", "must be a mapping"),
        ({"a.yaml": GOOD_GATEWAYS}, "a.yaml", 1, "/routes", "no routes"),
    ],
    ids=[
        "bad-yaml",
        "unknown-field",
        "bad-duration",
        "unknown-gateway",
        "default-region-without-gateway",
        "per-try-over-total",
        "duplicate-gateway-across-files",
        "duplicate-route",
        "not-a-mapping",
        "no-routes",
    ],
)
def test_problems_name_file_line_and_pointer(
    tmp_path: Path, files: dict[str, str], where: str, line: int, pointer: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_rules([write(tmp_path, **files)])
    matching = [i for i in caught.value.issues if words in i.message]
    assert matching, [str(i) for i in caught.value.issues]
    issue = matching[0]
    assert issue.file.endswith(where)
    assert issue.line == line
    assert issue.pointer == pointer
    assert str(issue).startswith(f"{issue.file}:{line}: ")


def test_every_problem_is_reported_not_just_the_first(tmp_path: Path) -> None:
    bad = GOOD_ROUTES.replace("[stripe-eu, adyen-us]", "[nope-1, nope-2]")
    with pytest.raises(ConfigError) as caught:
        load_rules([write(tmp_path, **{"a.yaml": GOOD_GATEWAYS, "b.yaml": bad})])
    assert sum("unknown gateway" in i.message for i in caught.value.issues) == 2


def test_yaml_12_booleans_keep_on_as_a_key(tmp_path: Path) -> None:
    rules = load_rules([write(tmp_path, **{"a.yaml": GOOD_GATEWAYS, "b.yaml": GOOD_ROUTES})])
    assert rules.routes[0].retry.on_timeout


def test_empty_directory_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no rules files"):
        load_rules([tmp_path])


def test_hidden_entries_are_skipped_for_configmap_layout(tmp_path: Path) -> None:
    data = tmp_path / "..2026_01_01"
    data.mkdir()
    shutil.copy(REPO / "rules" / "gateways.yaml", data / "gateways.yaml")
    shutil.copy(REPO / "rules" / "routes.yaml", data / "routes.yaml")
    (tmp_path / "..data").symlink_to(data.name)
    for name in ("gateways.yaml", "routes.yaml"):
        (tmp_path / name).symlink_to(f"..data/{name}")
    rules = load_rules([tmp_path])
    assert len(rules.files) == 2


@pytest.mark.parametrize(
    ("timeouts", "expected"),
    [("per_try: 500ms, total: 3s", 0.5), ("per_try: 500ms, total: 3s, unknown_after: 2s", 2.0)],
    ids=["defaults-to-per-try", "set"],
)
def test_unknown_after(tmp_path: Path, timeouts: str, expected: float) -> None:
    routes = GOOD_ROUTES.replace("per_try: 500ms, total: 3s", timeouts)
    rules = load_rules([write(tmp_path, **{"a.yaml": GOOD_GATEWAYS, "b.yaml": routes})])
    assert rules.routes[0].timeouts.unknown_after == expected


def test_unknown_after_must_be_positive(tmp_path: Path) -> None:
    routes = GOOD_ROUTES.replace("total: 3s", "total: 3s, unknown_after: 0s")
    with pytest.raises(ConfigError, match="unknown_after must be greater than zero"):
        load_rules([write(tmp_path, **{"a.yaml": GOOD_GATEWAYS, "b.yaml": routes})])
