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
            "/gateways/adyen-us/wieght",
            "unknown key `wieght`; did you mean `weight`?",
        ),
        (
            {
                "a.yaml": GOOD_GATEWAYS,
                "b.yaml": GOOD_ROUTES.replace("per_try: 500ms", "per_try: fast"),
            },
            "b.yaml",
            6,
            "/routes/0/timeouts/per_try",
            "`fast` is not a duration like 250ms",
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


DURATION = "a duration like 250ms, 2s, 1m, 24h (one number, one unit: ms, s, m, h, d)"


@pytest.mark.parametrize(
    ("gateways", "routes", "where", "line", "pointer", "message"),
    [
        (
            GOOD_GATEWAYS + "  stripe-eu: {url: 'http://127.0.0.1:1', region: eu}\n",
            GOOD_ROUTES,
            "a.yaml",
            4,
            "",
            "duplicate key `stripe-eu`: first written on line 2",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES.replace("timeouts:", "timeout:"),
            "b.yaml",
            6,
            "/routes/0/timeout",
            "unknown key `timeout`; did you mean `timeouts`?",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES.replace(
                "    timeouts: {per_try: 500ms, total: 3s}\n",
                "    timeouts:\n      total: 3s\n    per_try: 500ms\n",
            ),
            "b.yaml",
            8,
            "/routes/0/per_try",
            "unknown key `per_try`: it belongs inside `timeouts` (check its indentation)",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES + "    idempotency: {ttl: 1d12h}\n",
            "b.yaml",
            8,
            "/routes/0/idempotency/ttl",
            f"`1d12h` is not {DURATION}",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES.replace("per_try: 500ms", "per_try: 500"),
            "b.yaml",
            6,
            "/routes/0/timeouts/per_try",
            f"`500` needs a unit: write {DURATION}",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES + "    max_body: 64kb\n",
            "b.yaml",
            8,
            "/routes/0/max_body",
            "`64kb` is not a size like 64KiB, 1MiB, or a number of bytes",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES + "    max_body: 999999999999GiB\n",
            "b.yaml",
            8,
            "/routes/0/max_body",
            "max_body must be at most 64MiB (67,108,864 bytes): "
            "request bodies are held in memory so that a retry can replay them",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES + "    max_body: 67108865\n",
            "b.yaml",
            8,
            "/routes/0/max_body",
            "`67108865` must be at most 67,108,864",
        ),
        (
            GOOD_GATEWAYS.replace("provider: stripe", "provider: stripe, limits: {rate: 5/sec}"),
            GOOD_ROUTES,
            "a.yaml",
            2,
            "/gateways/stripe-eu/limits/rate",
            "`5/sec` is not a rate like 200/s, 600/m, or a number per second",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES.replace("after_ambiguous: any-gateway", "after_ambiguous: any_gateway"),
            "b.yaml",
            7,
            "/routes/0/retry/after_ambiguous",
            "`any_gateway` is not one of `never`, `same-provider`, `any-gateway`; "
            "did you mean `any-gateway`?",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES.replace("connect-failure,", "connect-fail,"),
            "b.yaml",
            7,
            "/routes/0/retry/on/0",
            "`connect-fail` is not one of `connect-failure`, `timeout`, `reset`, `5xx`; "
            "did you mean `connect-failure`?",
        ),
        (
            GOOD_GATEWAYS.replace("gateways:", "gateway:"),
            GOOD_ROUTES,
            "a.yaml",
            1,
            "/gateway",
            "unknown key `gateway`; did you mean `gateways`?",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES.replace("gateways: [stripe-eu, adyen-us]", "gateways: stripe-eu"),
            "b.yaml",
            5,
            "/routes/0/gateways",
            "expected a list, got `stripe-eu`",
        ),
        (
            GOOD_GATEWAYS.replace("adyen-us:", "Adyen US:"),
            GOOD_ROUTES,
            "a.yaml",
            3,
            "/gateways/Adyen US",
            "`Adyen US` is not a name of lower-case letters, digits, `.`, `_` or `-` (up to 63), "
            "like stripe-eu",
        ),
        (
            GOOD_GATEWAYS,
            GOOD_ROUTES.replace("timeouts: {per_try: 500ms, total: 3s}", "timeouts:"),
            "b.yaml",
            6,
            "/routes/0/timeouts",
            "expected a mapping (key: value), got an empty value",
        ),
        (
            GOOD_GATEWAYS.replace('url: "http://127.0.0.1:9101", ', ""),
            GOOD_ROUTES,
            "a.yaml",
            2,
            "/gateways/stripe-eu",
            "missing `url`",
        ),
        (
            GOOD_GATEWAYS + "---\nroutes: []\n",
            GOOD_ROUTES,
            "a.yaml",
            4,
            "",
            "one YAML document per file: remove the `---` separator",
        ),
        (
            GOOD_GATEWAYS + "  200: {url: 'http://127.0.0.1:1', region: eu}\n",
            GOOD_ROUTES,
            "a.yaml",
            4,
            "/gateways",
            'key 200 must be text: quote it ("200")',
        ),
    ],
    ids=[
        "duplicate-key-names-both-lines",
        "typo-suggests-closest-key",
        "mis-indented-key-at-its-own-line",
        "duration-of-wrong-form",
        "duration-without-unit",
        "size-of-wrong-form",
        "max-body-over-limit-as-text",
        "max-body-over-limit-as-number",
        "rate-of-wrong-form",
        "enum-suggests-closest",
        "retry-condition-suggests-closest",
        "top-level-typo",
        "wrong-type",
        "bad-name-at-the-key",
        "empty-block",
        "missing-key",
        "two-documents",
        "number-as-key",
    ],
)
def test_messages_say_what_to_write_at_the_offending_line(
    tmp_path: Path,
    gateways: str,
    routes: str,
    where: str,
    line: int,
    pointer: str,
    message: str,
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_rules([write(tmp_path, **{"a.yaml": gateways, "b.yaml": routes})])
    got = [(Path(i.file).name, i.line, i.pointer, i.message) for i in caught.value.issues]
    assert got == [(where, line, pointer, message)]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("x: [on, yes, no, off]\n", ["on", "yes", "no", "off"]),
        ("x: [true, false, True]\n", [True, False, True]),
    ],
    ids=["yaml-1.1-booleans-stay-text", "yaml-1.2-booleans"],
)
def test_yaml_12_semantics(tmp_path: Path, text: str, words: list[object]) -> None:
    from proxy.config.yamldoc import DEFAULT_LIMITS, parse

    issues: list[object] = []
    parsed = parse("a.yaml", text.encode(), issues, DEFAULT_LIMITS)  # type: ignore[arg-type]
    assert parsed is not None and parsed.value == {"x": words}


@pytest.mark.parametrize(
    ("gateway_extra", "retry", "pointer"),
    [
        ("weight: 3.0", "attempts: 3", "/gateways/stripe-eu/weight"),
        (
            "limits: {max_in_flight: 100.0}",
            "attempts: 3",
            "/gateways/stripe-eu/limits/max_in_flight",
        ),
        (
            "limits: {max_connections: 64.0}",
            "attempts: 3",
            "/gateways/stripe-eu/limits/max_connections",
        ),
        ("limits: {rate: 10/s, burst: 50.0}", "attempts: 3", "/gateways/stripe-eu/limits/burst"),
        (
            "outlier: {consecutive_failures: 5.0}",
            "attempts: 3",
            "/gateways/stripe-eu/outlier/consecutive_failures",
        ),
        ("weight: 1", "attempts: 3.0", "/routes/0/retry/attempts"),
    ],
    ids=["weight", "max-in-flight", "max-connections", "burst", "consecutive-failures", "attempts"],
)
def test_a_whole_number_written_as_a_float_is_refused(
    tmp_path: Path, gateway_extra: str, retry: str, pointer: str
) -> None:
    """JSON Schema's `integer` admits 3.0; the rules do not: the model, and the compiled
    request path, hold these as int."""
    gateways = GOOD_GATEWAYS.replace("weight: 3, ", "")
    gateways = gateways.replace("provider: stripe}", f"provider: stripe, {gateway_extra}}}")
    routes = GOOD_ROUTES.replace("attempts: 3", retry)
    with pytest.raises(ConfigError) as caught:
        load_rules([write(tmp_path, **{"a.yaml": gateways, "b.yaml": routes})])
    [issue] = caught.value.issues
    assert issue.pointer == pointer
    assert "expected a whole number" in issue.message


def test_a_status_written_as_a_float_is_refused(tmp_path: Path) -> None:
    routes = GOOD_ROUTES.replace("502, 503", "502.0, 503")
    with pytest.raises(ConfigError) as caught:
        load_rules([write(tmp_path, **{"a.yaml": GOOD_GATEWAYS, "b.yaml": routes})])
    assert [i.pointer for i in caught.value.issues] == ["/routes/0/retry/on/2"]


@pytest.mark.parametrize(
    "url", ["http://[127.0.0.1:9101", "http://127.0.0.1]:9101", "http://[::1:9101/x"]
)
def test_a_gateway_url_that_does_not_parse_is_refused_at_its_line(tmp_path: Path, url: str) -> None:
    gateways = GOOD_GATEWAYS.replace("http://127.0.0.1:9101", url)
    with pytest.raises(ConfigError) as caught:
        load_rules([write(tmp_path, **{"a.yaml": gateways, "b.yaml": GOOD_ROUTES})])
    issue = next(i for i in caught.value.issues if i.pointer == "/gateways/stripe-eu/url")
    assert issue.line == 2
    assert "not a URL" in issue.message


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("http://[127.0.0.1:9101", "not a URL"),
        ("http://127.0.0.1:99999", "invalid port"),
        ("http://:9101", "no host"),
    ],
)
def test_a_refused_gateway_is_reported_once_not_again_by_its_routes(
    tmp_path: Path, url: str, says: str
) -> None:
    """The routes naming it are left out too, without saying the gateway is not defined:
    the file defines it, and its own line says what is wrong with it."""
    gateways = GOOD_GATEWAYS.replace("http://127.0.0.1:9101", url)
    with pytest.raises(ConfigError) as caught:
        load_rules([write(tmp_path, **{"a.yaml": gateways, "b.yaml": GOOD_ROUTES})])
    [issue] = caught.value.issues
    assert issue.pointer == "/gateways/stripe-eu/url"
    assert says in issue.message
