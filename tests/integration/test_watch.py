"""The rules watcher against real files: edits, new and deleted files, ConfigMap swaps.

Each test starts `ConfigStore.run_watcher` on a copy of the example rules in tmp_path,
changes the files the way an SRE or the kubelet would, and polls the store until the new
generation serves (or the refusal is recorded), within a couple of seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
import watchfiles
from prometheus_client import CollectorRegistry

from proxy.aio import cancel_and_wait, spawn
from proxy.config.model import Rules
from proxy.config.store import ConfigStore
from proxy.config.watch import change_filter, watch_rules, watch_targets
from proxy.events import RecordingEmitter

EXAMPLE_RULES = Path(__file__).resolve().parents[2] / "rules"
DEADLINE = 2.0

EXTRA = b"""\
gateways:
  extra-eu:
    url: http://127.0.0.1:9199
    region: eu
    provider: extra
"""


def gateway_names(rules: Rules) -> frozenset[str]:
    return frozenset(rules.gateways)


async def wait_for(what: str, check: Callable[[], bool], within: float = DEADLINE) -> None:
    """Poll `check` until it holds; fail naming `what` after `within` seconds."""
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            pytest.fail(f"not within {within}s: {what}")
        await asyncio.sleep(0.01)


def example_sources() -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(EXAMPLE_RULES.glob("*.yaml"))}


def configmap_publish(root: Path, files: dict[str, bytes], stamp: str) -> None:
    """Write `files` the way the kubelet updates a ConfigMap volume.

    A new timestamped directory, a `..data_tmp` symlink to it renamed over `..data`, then
    the previous directory removed. The visible `x.yaml -> ..data/x.yaml` links never change.
    """
    new = root / f"..{stamp}"
    new.mkdir()
    for name, data in files.items():
        (new / name).write_bytes(data)
    old = os.readlink(root / "..data") if (root / "..data").is_symlink() else None
    tmp = root / "..data_tmp"
    tmp.symlink_to(new.name)
    os.rename(tmp, root / "..data")
    for name in files:
        link = root / name
        if not link.is_symlink():
            link.symlink_to(Path("..data") / name)
    if old is not None:
        shutil.rmtree(root / old)


@dataclass
class Watched:
    dir: Path
    store: ConfigStore[frozenset[str]]
    registry: CollectorRegistry

    @property
    def generation(self) -> int:
        return self.store.current.generation

    def reloads(self, result: str) -> float:
        return (
            self.registry.get_sample_value("payswitch_config_reloads_total", {"result": result})
            or 0.0
        )

    def edit(self, name: str, old: str, new: str) -> None:
        path = self.dir / name
        path.write_text(path.read_text().replace(old, new, 1))


def yaml_files(dir: Path) -> list[Path]:
    return sorted(dir.glob("*.yaml"))


@contextlib.asynccontextmanager
async def watching(dir: Path, paths: Sequence[Path]) -> AsyncIterator[Watched]:
    registry = CollectorRegistry()
    store = ConfigStore(paths, gateway_names, events=RecordingEmitter(), registry=registry)
    store.load_initial()
    stop = asyncio.Event()
    task = spawn(store.run_watcher(stop), name="test-rules-watcher")
    w = Watched(dir, store, registry)
    # Ready once a change is noticed: poke a hidden entry (ignored by the loader, seen by
    # the watcher even when it watches single files) until a reload runs.
    probe = dir / "..probe"
    deadline = time.monotonic() + DEADLINE
    while w.reloads("unchanged") == 0:
        assert time.monotonic() < deadline, "watcher did not start"
        probe.write_bytes(b"")
        probe.unlink()
        await asyncio.sleep(0.02)
    assert w.generation == 1
    yield w
    stop.set()
    try:
        async with asyncio.timeout(5):
            await task
    finally:
        await cancel_and_wait(task)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    target = tmp_path / "rules"
    target.mkdir()
    for name, data in example_sources().items():
        (target / name).write_bytes(data)
    (target / "extra.yaml").write_bytes(EXTRA)
    return target


@pytest.fixture
async def watched(rules_dir: Path) -> AsyncIterator[Watched]:
    async with watching(rules_dir, [rules_dir]) as w:
        yield w


@pytest.fixture
def configmap_dir(tmp_path: Path) -> Path:
    target = tmp_path / "configmap"
    target.mkdir()
    configmap_publish(target, example_sources(), "2026_11_25_13_00_00.1")
    return target


async def test_file_edit_reloads(watched: Watched) -> None:
    watched.edit("extra.yaml", "9199", "9198")
    await wait_for("edit picked up", lambda: watched.generation == 2)
    assert watched.store.current.rules.gateways["extra-eu"].port == 9198


async def test_new_file_reloads(watched: Watched) -> None:
    (watched.dir / "more.yml").write_bytes(EXTRA.replace(b"extra-eu", b"more-eu"))
    await wait_for("new file picked up", lambda: watched.generation == 2)
    assert "more-eu" in watched.store.current.compiled


async def test_deleted_file_reloads(watched: Watched) -> None:
    (watched.dir / "extra.yaml").unlink()
    await wait_for("deletion picked up", lambda: watched.generation == 2)
    assert "extra-eu" not in watched.store.current.compiled


async def test_bad_change_keeps_old_rules_until_fixed(watched: Watched) -> None:
    old = watched.store.current
    watched.edit("extra.yaml", "region: eu", "region: [eu")
    await wait_for("refusal recorded", lambda: watched.store.last_error is not None)
    assert watched.store.current is old
    err = watched.store.last_error
    assert err is not None and err.issues[0].file == str(watched.dir / "extra.yaml")
    watched.edit("extra.yaml", "region: [eu", "region: us")
    await wait_for("fix picked up", lambda: watched.generation == 2)
    assert watched.store.current.rules.gateways["extra-eu"].region == "us"


async def test_directory_briefly_empty(watched: Watched, tmp_path: Path) -> None:
    aside = tmp_path / "aside"
    aside.mkdir()
    for f in watched.dir.glob("*.yaml"):
        f.rename(aside / f.name)
    await wait_for("empty directory refused", lambda: watched.store.last_error is not None)
    assert watched.generation == 1
    (aside / "extra.yaml").write_bytes(EXTRA.replace(b"9199", b"9197"))
    for f in aside.iterdir():
        f.rename(watched.dir / f.name)
    await wait_for("files back", lambda: watched.generation == 2)
    assert watched.store.current.rules.gateways["extra-eu"].port == 9197


async def test_directory_replaced(watched: Watched, tmp_path: Path) -> None:
    # Some deploy tools swap the whole directory; the old inode's watch then sees nothing.
    fresh = tmp_path / "fresh"
    shutil.copytree(watched.dir, fresh)
    (fresh / "extra.yaml").unlink()
    old = tmp_path / "old"
    watched.dir.rename(old)
    fresh.rename(watched.dir)
    await wait_for("new directory watched", lambda: watched.generation == 2, within=DEADLINE + 1)
    assert "extra-eu" not in watched.store.current.compiled


@pytest.mark.parametrize("as_files", [False, True], ids=["directory", "single-files"])
async def test_configmap_data_swap_reloads(configmap_dir: Path, as_files: bool) -> None:
    paths = yaml_files(configmap_dir) if as_files else [configmap_dir]
    async with watching(configmap_dir, paths) as w:
        files = example_sources()
        files["gateways.yaml"] = files["gateways.yaml"].replace(b"weight: 3", b"weight: 6")
        configmap_publish(configmap_dir, files, "2026_11_25_13_05_00.2")
        await wait_for("..data swap picked up", lambda: w.generation == 2)
        assert w.store.current.rules.gateways["stripe-eu"].weight == 6
        assert w.store.current.rules.files == tuple(str(p) for p in yaml_files(configmap_dir))


async def test_single_file_edit_reloads(rules_dir: Path) -> None:
    paths = [rules_dir / "gateways.yaml", rules_dir / "routes.yaml"]
    async with watching(rules_dir, paths) as w:
        w.edit("gateways.yaml", "weight: 3", "weight: 2")
        await wait_for("watched file picked up", lambda: w.generation == 2)
        assert w.store.current.rules.gateways["stripe-eu"].weight == 2


@pytest.mark.parametrize(
    ("watched", "changed", "wanted"),
    [
        ("rules", "rules/a.yaml", True),
        ("rules", "rules/notes.txt", True),  # cheap: the store skips unchanged content
        ("rules", "rules/..data", True),
        ("rules/a.yaml", "rules/a.yaml", True),
        ("rules/a.yaml", "rules/b.yaml", False),
        ("rules/a.yaml", "rules/..data", True),
        ("rules/a.yaml", "rules/..2026_11_25_13_00_00.1", True),
        ("rules/a.yaml", "other/a.yaml", False),
        ("later", "later/a.yaml", True),  # missing and not named like a file: a directory
        ("later.yaml", "later.yaml", True),
        ("later.yaml", "x.yaml", False),
    ],
    ids=lambda v: str(v),
)
def test_change_filter(tmp_path: Path, watched: str, changed: str, wanted: bool) -> None:
    (tmp_path / "rules").mkdir()
    (tmp_path / "rules" / "a.yaml").write_bytes(b"")
    targets = watch_targets([tmp_path / watched])
    accept = change_filter(targets)
    assert accept(watchfiles.Change.modified, str(tmp_path / changed)) is wanted


async def test_watcher_waits_for_a_missing_directory(tmp_path: Path) -> None:
    target = tmp_path / "later"
    calls = 0

    async def changed() -> None:
        nonlocal calls
        calls += 1

    stop = asyncio.Event()
    task = spawn(watch_rules([target], changed, stop=stop, recheck_ms=50), name="test-watch")
    try:
        await asyncio.sleep(0)  # let the watcher find the directory missing first
        target.mkdir()
        await wait_for("directory noticed", lambda: calls >= 1)
        seen = calls
        deadline = time.monotonic() + DEADLINE
        while calls == seen:
            assert time.monotonic() < deadline, "changes in the new directory not noticed"
            (target / "x.yaml").write_bytes(b"a")
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task


async def test_failing_handler_does_not_stop_the_watcher(tmp_path: Path) -> None:
    calls = 0

    async def changed() -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError("reload bug")

    stop = asyncio.Event()
    task = spawn(watch_rules([tmp_path], changed, stop=stop), name="test-watch")
    try:
        deadline = time.monotonic() + DEADLINE
        n = 0
        while calls < 2:
            assert time.monotonic() < deadline, f"only {calls} call(s)"
            n += 1
            (tmp_path / f"x{n}.yaml").write_bytes(b"a")
            await asyncio.sleep(0.02)
    finally:
        stop.set()
        async with asyncio.timeout(5):
            await task
