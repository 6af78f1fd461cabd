"""Tests for proxy.config.store: validate everything, then swap one reference, or change nothing."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from proxy.clock import ManualClock
from proxy.config.load import ConfigError, ConfigIssue
from proxy.config.model import Rules
from proxy.config.store import ConfigStore, Snapshot
from proxy.events import RecordingEmitter

EXAMPLE_RULES = Path(__file__).resolve().parents[3] / "rules"

#: A weight the stand-in compiler refuses, as a real router compiler refuses what it
#: cannot build: with a ConfigError naming where the rules say it.
REFUSED_WEIGHT = 7


@dataclass(frozen=True)
class Compiled:
    routes: tuple[str, ...]


def compile_rules(rules: Rules) -> Compiled:
    for gw in rules.gateways.values():
        if gw.weight == REFUSED_WEIGHT:
            raise ConfigError(
                [
                    ConfigIssue(
                        gw.source.file,
                        gw.source.line,
                        f"/gateways/{gw.name}",
                        "weight 7 cannot be compiled",
                    )
                ]
            )
        if gw.weight == 13:
            raise ZeroDivisionError("compiler bug")
    return Compiled(routes=tuple(r.name for r in rules.routes))


@dataclass
class Harness:
    dir: Path
    store: ConfigStore[Compiled]
    events: RecordingEmitter
    registry: CollectorRegistry
    clock: ManualClock
    swaps: list[tuple[int, int | None]]

    def edit(self, name: str, old: str, new: str) -> None:
        path = self.dir / name
        text = path.read_text(encoding="utf-8")
        assert old in text, f"{old!r} not in {name}"
        path.write_text(text.replace(old, new, 1), encoding="utf-8")

    def line_of(self, name: str, text: str) -> int:
        lines = (self.dir / name).read_text(encoding="utf-8").splitlines()
        return next(i for i, line in enumerate(lines, 1) if text in line)

    def reloads(self, result: str) -> float | None:
        return self.registry.get_sample_value("payswitch_config_reloads_total", {"result": result})

    def gauge(self, name: str) -> float | None:
        return self.registry.get_sample_value(name)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    target.mkdir()
    for f in EXAMPLE_RULES.glob("*.yaml"):
        shutil.copy(f, target / f.name)
    return target


@pytest.fixture
def h(rules_dir: Path) -> Harness:
    events = RecordingEmitter()
    registry = CollectorRegistry()
    clock = ManualClock()
    swaps: list[tuple[int, int | None]] = []

    def on_swap(new: Snapshot[Compiled], old: Snapshot[Compiled] | None) -> None:
        swaps.append((new.generation, old.generation if old is not None else None))

    store = ConfigStore(
        [rules_dir],
        compile_rules,
        listeners=[on_swap],
        events=events,
        clock=clock,
        registry=registry,
    )
    return Harness(rules_dir, store, events, registry, clock, swaps)


@pytest.fixture
def loaded(h: Harness) -> Harness:
    h.store.load_initial()
    return h


def test_initial_load_is_generation_one(h: Harness) -> None:
    snap = h.store.load_initial()
    assert h.store.current is snap
    assert snap.generation == 1
    assert snap.trigger == "initial"
    assert snap.loaded_at == h.clock.wall()
    assert snap.compiled.routes == ("deposits", "withdrawals", "payment-status")
    assert snap.rules.content_hash == snap.hash != ""
    assert h.swaps == [(1, None)]
    [event] = h.events.of("config.loaded")
    assert event.fields["generation"] == 1
    assert event.fields["routes"] == ["deposits", "withdrawals", "payment-status"]
    assert h.gauge("payswitch_config_generation") == 1
    assert h.reloads("success") == 1


def test_initial_load_failure_is_raised(h: Harness) -> None:
    h.edit("gateways.yaml", "    weight: 3\n", "    weight: -3\n")
    with pytest.raises(ConfigError) as err:
        h.store.load_initial()
    assert err.value.issues[0].line == h.line_of("gateways.yaml", "weight: -3")
    assert not h.store.loaded
    assert h.store.last_error is not None
    assert h.events.kinds() == ["config.rejected"]
    with pytest.raises(RuntimeError, match="not loaded"):
        _ = h.store.current


async def test_valid_change_swaps_and_bumps_generation(loaded: Harness) -> None:
    h = loaded
    old = h.store.current
    h.clock.advance(5)
    h.edit("gateways.yaml", "    weight: 3\n", "    weight: 4\n")
    result = await h.store.reload("admin")
    new = h.store.current
    assert (result.outcome, result.generation, result.hash) == ("success", 2, new.hash)
    assert (new.generation, new.trigger, new.loaded_at) == (2, "admin", h.clock.wall())
    assert new.rules.gateways["stripe-eu"].weight == 4
    assert old.rules.gateways["stripe-eu"].weight == 3, "the old snapshot is never mutated"
    assert h.swaps == [(1, None), (2, 1)]
    assert [e.fields["generation"] for e in h.events.of("config.loaded")] == [1, 2]
    assert h.gauge("payswitch_config_generation") == 2


@pytest.mark.parametrize(
    "rewrite",
    [
        lambda p: p.write_bytes(p.read_bytes()),
        lambda p: p.touch(),
    ],
    ids=["same-bytes-rewritten", "touched"],
)
async def test_unchanged_content_does_not_bump(
    loaded: Harness, rewrite: Callable[[Path], None]
) -> None:
    h = loaded
    snap = h.store.current
    rewrite(h.dir / "routes.yaml")
    result = await h.store.reload("watch")
    assert (result.outcome, result.generation) == ("unchanged", 1)
    assert h.store.current is snap
    assert h.swaps == [(1, None)]
    assert h.reloads("unchanged") == 1


@dataclass(frozen=True)
class Refusal:
    file: str
    marker: str  # text on the line the issue must point at
    message: str


def _bad_yaml(h: Harness) -> Refusal:
    h.edit("gateways.yaml", "    weight: 3\n", "    weight: 3: 4\n")
    return Refusal("gateways.yaml", "weight: 3: 4", "invalid YAML")


def _schema_violation(h: Harness) -> Refusal:
    h.edit("gateways.yaml", "    weight: 3\n", "    weight: -3\n")
    return Refusal("gateways.yaml", "weight: -3", "")


def _unknown_gateway(h: Harness) -> Refusal:
    h.edit(
        "routes.yaml",
        "gateways: [stripe-eu, adyen-eu, stripe-us, adyen-us]",
        "gateways: [stripe-eu, paypal-eu, stripe-us, adyen-us]",
    )
    return Refusal("routes.yaml", "paypal-eu", "unknown gateway 'paypal-eu'")


def _compile_error(h: Harness) -> Refusal:
    h.edit("gateways.yaml", "    weight: 3\n", f"    weight: {REFUSED_WEIGHT}\n")
    return Refusal("gateways.yaml", "stripe-eu:", "cannot be compiled")


def _compiler_crash(h: Harness) -> Refusal:
    h.edit("gateways.yaml", "    weight: 3\n", "    weight: 13\n")
    return Refusal("", "", "cannot compile rules: ZeroDivisionError")


def _no_files(h: Harness) -> Refusal:
    for f in h.dir.glob("*.yaml"):
        f.unlink()
    return Refusal("", "", "no rules files")


@pytest.mark.parametrize(
    "breaks",
    [_bad_yaml, _schema_violation, _unknown_gateway, _compile_error, _compiler_crash, _no_files],
    ids=[
        "invalid-yaml",
        "schema-violation",
        "unknown-gateway",
        "compile-error",
        "compiler-crash",
        "no-files",
    ],
)
async def test_refused_change_keeps_old_snapshot(
    loaded: Harness, breaks: Callable[[Harness], Refusal]
) -> None:
    h = loaded
    old = h.store.current
    expected = breaks(h)
    result = await h.store.reload("watch")
    assert result.outcome == "failure"
    assert result.generation == 1
    assert h.store.current is old
    assert h.swaps == [(1, None)]
    issue = result.issues[0]
    assert expected.message in issue.message
    if expected.file:
        assert issue.file == str(h.dir / expected.file)
        assert issue.line == h.line_of(expected.file, expected.marker)
    err = h.store.last_error
    assert err is not None
    assert (err.issues, err.trigger, err.superseded) == (result.issues, "watch", False)
    [rejected] = h.events.of("config.rejected")
    assert rejected.fields["issues"] == [i.as_dict() for i in result.issues]
    assert h.reloads("failure") == 1
    assert h.gauge("payswitch_config_last_reload_successful") == 0


async def test_same_refused_content_is_reported_once(loaded: Harness) -> None:
    h = loaded
    _bad_yaml(h)
    first = await h.store.reload("watch")
    second = await h.store.reload("watch")
    assert first.issues == second.issues
    assert len(h.events.of("config.rejected")) == 1
    assert h.reloads("failure") == 2


async def test_fix_after_refusal_supersedes_last_error(loaded: Harness) -> None:
    h = loaded
    _unknown_gateway(h)
    await h.store.reload("watch")
    h.edit("routes.yaml", "paypal-eu, stripe-us, adyen-us", "adyen-eu, adyen-us")
    result = await h.store.reload("watch")
    assert (result.outcome, result.generation) == ("success", 2)
    err = h.store.last_error
    assert err is not None and err.superseded
    assert h.gauge("payswitch_config_last_reload_successful") == 1


async def test_revert_to_serving_content_supersedes_last_error(loaded: Harness) -> None:
    h = loaded
    _schema_violation(h)
    await h.store.reload("watch")
    h.edit("gateways.yaml", "weight: -3", "weight: 3")
    result = await h.store.reload("watch")
    assert (result.outcome, result.generation) == ("unchanged", 1)
    err = h.store.last_error
    assert err is not None and err.superseded


async def test_concurrent_reloads_publish_once(loaded: Harness) -> None:
    h = loaded
    h.edit("gateways.yaml", "    weight: 3\n", "    weight: 5\n")
    results = await asyncio.gather(h.store.reload("watch"), h.store.reload("signal"))
    assert sorted(r.outcome for r in results) == ["success", "unchanged"]
    assert h.store.current.generation == 2
    assert h.swaps == [(1, None), (2, 1)]


async def test_failing_listener_does_not_stop_the_others(loaded: Harness) -> None:
    h = loaded
    seen: list[int] = []

    def broken(new: Snapshot[Compiled], old: Snapshot[Compiled] | None) -> None:
        raise RuntimeError("reconcile bug")

    h.store.add_listener(broken)
    h.store.add_listener(lambda new, old: seen.append(new.generation))
    h.edit("gateways.yaml", "    weight: 3\n", "    weight: 4\n")
    result = await h.store.reload("admin")
    assert result.outcome == "success"
    assert h.store.current.generation == 2
    assert seen == [2]


def test_load_initial_runs_once(loaded: Harness) -> None:
    with pytest.raises(RuntimeError, match="once"):
        loaded.store.load_initial()


@pytest.mark.parametrize(
    "failure",
    [RuntimeError("state registry broke"), ConfigError([ConfigIssue("f", 1, "/x", "bad")])],
    ids=["bug", "config-error"],
)
async def test_a_binder_failing_refuses_the_reload_and_nothing_is_published(
    rules_dir: Path, failure: Exception
) -> None:
    events = RecordingEmitter()
    registry = CollectorRegistry()
    swaps: list[int] = []
    bound: list[Compiled] = []
    fail = False

    def bind(rules: Rules, compiled: Compiled) -> None:
        if fail:
            raise failure
        bound.append(compiled)

    def on_swap(new: Snapshot[Compiled], old: Snapshot[Compiled] | None) -> None:
        assert new.compiled is bound[-1], "published before it was bound"
        swaps.append(new.generation)

    store = ConfigStore(
        [rules_dir],
        compile_rules,
        listeners=[on_swap],
        binders=[bind],
        events=events,
        registry=registry,
    )
    first = store.load_initial()
    fail = True
    (rules_dir / "gateways.yaml").write_text(
        (rules_dir / "gateways.yaml").read_text().replace("weight: 3", "weight: 4", 1)
    )
    result = await store.reload("admin")
    assert result.outcome == "failure"
    assert store.current is first
    assert swaps == [1]
    assert store.last_error is not None
    assert registry.get_sample_value("payswitch_config_reloads_total", {"result": "failure"}) == 1
    fail = False
    assert (await store.reload("admin")).outcome == "success"
    assert swaps == [1, 2]


def test_a_binder_failing_on_the_first_load_is_fatal(rules_dir: Path) -> None:
    def bind(rules: Rules, compiled: Compiled) -> None:
        raise RuntimeError("no state")

    store = ConfigStore([rules_dir], compile_rules, binders=[bind])
    with pytest.raises(ConfigError, match="cannot bind runtime state"):
        store.load_initial()
    assert not store.loaded


async def test_a_binder_added_later_refuses_the_next_reload_with_its_issue(
    rules_dir: Path,
) -> None:
    store = ConfigStore([rules_dir], compile_rules)
    first = store.load_initial()

    def refuse(rules: Rules, compiled: Compiled) -> None:
        raise ConfigError([ConfigIssue("rules", 0, "", "not with several workers")])

    store.add_binder(refuse)
    (rules_dir / "gateways.yaml").write_text(
        (rules_dir / "gateways.yaml").read_text().replace("weight: 3", "weight: 4", 1)
    )
    result = await store.reload("signal")
    assert result.outcome == "failure"
    assert store.current is first
    assert store.last_error is not None
    assert "not with several workers" in str(store.last_error)
