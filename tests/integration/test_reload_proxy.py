"""Hot reload through a real payswitch: which gateway serves follows the rules on disk.

Each test runs the proxy with its rules watcher (or the admin endpoint) over real simulated
gateways, changes the rules the way an SRE or the kubelet would, and checks the answer of
the next requests (X-Payswitch-Gateway), the admin API, runtime state and metrics. The
load tests replace the rules many times a second under a steady stream of payments and
require every one of them to be answered by a gateway some valid rules allowed.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from proxy.aio import spawn
from proxy.upstream.state import Flag
from tests.support import Proxy, eventually, gateways, running_proxy

DEADLINE = 5.0


def rules_text(
    urls: Mapping[str, str],
    route_to: Sequence[str],
    *,
    weights: Mapping[str, int] | None = None,
    extra: Mapping[str, str] | None = None,
) -> str:
    """Rules defining `urls` as gateways (all in region eu) and one deposits route.

    `extra` adds flow-mapping fields to a gateway, e.g. `{"g1": "health_check: {...}"}`.
    """
    lines = ["gateways:"]
    for name, url in urls.items():
        fields = [f"url: '{url}'", "region: eu", f"weight: {(weights or {}).get(name, 1)}"]
        if extra and name in extra:
            fields.append(extra[name])
        lines.append(f"  {name}: {{{', '.join(fields)}}}")
    lines += [
        "routes:",
        "  - name: deposits",
        "    match: {path_prefix: /v1/deposits, methods: [POST]}",
        "    region: {default: eu}",
        f"    gateways: [{', '.join(route_to)}]",
        "    timeouts: {per_try: 2s, total: 5s}",
    ]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` whole, as a deploy tool does: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


class ConfigMapDir:
    """A directory laid out like a ConfigMap volume: `x.yaml -> ..data/x.yaml`, and
    `..data -> ..<stamp>`, where an update renames a fresh `..data` link over the old one."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._stamps = itertools.count(1)

    def publish(self, files: Mapping[str, str]) -> None:
        stamp = f"..2026_11_25_13_00_00.{next(self._stamps)}"
        new = self.root / stamp
        new.mkdir()
        for name, text in files.items():
            (new / name).write_text(text, encoding="utf-8")
        data = self.root / "..data"
        old = os.readlink(data) if data.is_symlink() else None
        tmp = self.root / "..data_tmp"
        tmp.symlink_to(stamp)
        os.replace(tmp, data)
        for name in files:
            link = self.root / name
            if not link.is_symlink():
                link.symlink_to(Path("..data") / name)
        if old is not None:
            shutil.rmtree(self.root / old)


async def served_by(p: Proxy, n: int = 4) -> set[str]:
    """The gateways that answered `n` payments; every one must succeed."""
    seen: set[str] = set()
    for _ in range(n):
        status, headers, body = await p.post()
        assert status == 200, body
        seen.add(headers["X-Payswitch-Gateway"])
    return seen


async def wait_served_by(p: Proxy, expected: set[str], within: float = DEADLINE) -> None:
    """Poll with real payments until exactly `expected` answers them."""
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    last: set[str] = set()
    while loop.time() < end:
        last = await served_by(p)
        if last == expected:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"not served by {sorted(expected)} within {within}s; last {sorted(last)}")


async def admin_json(p: Proxy, method: str, path: str) -> tuple[int, Any]:
    """(status, decoded JSON body) of an admin call."""
    async with p.session.request(method, p.admin_url + path) as resp:
        return resp.status, await resp.json()


async def metric(p: Proxy, name: str, labels: str = "") -> float:
    """A sample as Prometheus scrapes it from /metrics."""
    async with p.session.get(p.admin_url + "/metrics") as resp:
        text = await resp.text()
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    raise AssertionError(f"{wanted} not on /metrics")


@contextlib.asynccontextmanager
async def watched_proxy(text: str, tmp_path: Path, **overrides: object) -> AsyncIterator[Proxy]:
    """payswitch with its watcher on, returned once the watcher has seen a change."""
    async with running_proxy(text, tmp_path, watch=True, **overrides) as p:
        await wait_watching(p)
        yield p


async def wait_watching(p: Proxy) -> None:
    # Poke a hidden entry (seen by the watcher, skipped by the loader) until a reload runs:
    # before that, a change made right after start could slip past the watcher.
    probe = p.rules_dir / "..probe"
    loop = asyncio.get_running_loop()
    end = loop.time() + DEADLINE
    reloads = p.rt.registry.get_sample_value
    while (reloads("payswitch_config_reloads_total", {"result": "unchanged"}) or 0) == 0:
        assert loop.time() < end, "watcher did not start"
        probe.write_bytes(b"")
        probe.unlink()
        await asyncio.sleep(0.02)
    assert p.rt.store.current.generation == 1


# -- each kind of change moves traffic ----------------------------------------------------


async def test_file_edit_moves_traffic(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        async with watched_proxy(rules_text(urls, ["g1"]), tmp_path) as p:
            assert await served_by(p) == {"g1"}
            (p.rules_dir / "rules.yaml").write_text(rules_text(urls, ["g2"]))
            await wait_served_by(p, {"g2"})
            assert p.rt.store.current.generation == 2
            assert p.rt.store.current.trigger == "watch"


async def test_new_file_and_deleted_file_move_traffic(tmp_path: Path) -> None:
    # Routes are matched in file order: a file sorting first can take over a path.
    override = "\n".join(
        [
            "routes:",
            "  - name: deposits-override",
            "    match: {path_prefix: /v1/deposits, methods: [POST]}",
            "    region: {default: eu}",
            "    gateways: [g2]",
        ]
    )
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        async with watched_proxy(rules_text(urls, ["g1"]), tmp_path) as p:
            assert await served_by(p) == {"g1"}
            write_atomic(p.rules_dir / "00-override.yaml", override + "\n")
            await wait_served_by(p, {"g2"})
            assert p.rt.store.current.rules.routes[0].name == "deposits-override"
            (p.rules_dir / "00-override.yaml").unlink()
            await wait_served_by(p, {"g1"})
            assert p.rt.store.current.generation == 3


async def test_configmap_data_swap_moves_traffic(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        cm = ConfigMapDir(tmp_path / "rules")
        cm.root.mkdir()
        cm.publish({"rules.yaml": rules_text(urls, ["g1"])})
        async with watched_proxy(rules_text(urls, ["g1"]), tmp_path) as p:
            assert (p.rules_dir / "rules.yaml").is_symlink()
            assert await served_by(p) == {"g1"}
            cm.publish({"rules.yaml": rules_text(urls, ["g2"])})
            await wait_served_by(p, {"g2"})
            assert p.rt.store.current.generation == 2


async def test_admin_reload_moves_traffic_without_the_watcher(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        async with running_proxy(rules_text(urls, ["g1"]), tmp_path, watch=False) as p:
            (p.rules_dir / "rules.yaml").write_text(rules_text(urls, ["g2"]))
            await asyncio.sleep(0.2)
            assert await served_by(p) == {"g1"}, "nothing reloads without the watcher"
            status, body = await admin_json(p, "POST", "/admin/reload")
            assert status == 200
            assert body["outcome"] == "success" and body["generation"] == 2
            assert await served_by(p) == {"g2"}
            status, body = await admin_json(p, "GET", "/admin/config")
            assert (body["generation"], body["trigger"], body["last_error"]) == (2, "admin", None)


async def test_configmap_update_landing_mid_read_is_not_mixed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two keys of one ConfigMap, and an update swapping `..data` after the first file was
    # read: what is read must be one version or the other, never one file of each.
    def version(gw: str, url: str) -> dict[str, str]:
        text = rules_text({gw: url}, [gw])
        gateways_part, _, routes_part = text.partition("routes:")
        return {"rules.yaml": gateways_part, "routes.yaml": "routes:" + routes_part}

    async with gateways("g1", "g2") as g:
        v1, v2 = version("g1", g["g1"].url), version("g2", g["g2"].url)
        cm = ConfigMapDir(tmp_path / "rules")
        cm.root.mkdir()
        cm.publish(v1)
        async with running_proxy(v1["rules.yaml"], tmp_path) as p:
            assert await served_by(p) == {"g1"}
            read_bytes = Path.read_bytes
            updates = [v2]

            def read_during_an_update(path: Path) -> bytes:
                data = read_bytes(path)
                if updates:
                    cm.publish(updates.pop())
                return data

            monkeypatch.setattr(Path, "read_bytes", read_during_an_update)
            result = await p.rt.store.reload("admin")
            monkeypatch.undo()
            assert (result.outcome, result.issues) == ("success", ())
            assert p.events.kinds("config.rejected") == []
            assert await served_by(p) == {"g2"}


# -- invalid changes are refused and the old rules keep serving ---------------------------


def _line_of(text: str, marker: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if marker in line)


@pytest.mark.parametrize(
    ("old", "new", "pointer", "message"),
    [
        ("region: eu,", "region: [eu,", "", "YAML"),
        ("weight: 1}", "weight: heavy}", "/gateways/g1/weight", ""),
        ("gateways: [g1]", "gateways: [ghost]", "/routes/0/gateways/0", "unknown gateway"),
    ],
    ids=["bad-yaml", "schema-violation", "unknown-gateway"],
)
async def test_invalid_change_is_refused_and_old_rules_keep_serving(
    tmp_path: Path, old: str, new: str, pointer: str, message: str
) -> None:
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        good = rules_text(urls, ["g1"])
        async with watched_proxy(good, tmp_path) as p:
            serving = p.rt.store.current
            bad = good.replace(old, new, 1)
            assert bad != good
            write_atomic(p.rules_dir / "rules.yaml", bad)
            await eventually(lambda: p.rt.store.last_error is not None, within=DEADLINE)
            assert p.rt.store.current is serving
            assert await served_by(p) == {"g1"}

            status, view = await admin_json(p, "GET", "/admin/config")
            assert status == 200 and view["generation"] == 1
            err = view["last_error"]
            assert isinstance(err, dict) and err["superseded"] is False
            issue = err["issues"][0]
            assert issue["file"] == str(p.rules_dir / "rules.yaml")
            assert issue["line"] == _line_of(bad, new)
            assert issue["pointer"] == pointer
            assert message.lower() in issue["message"].lower()
            assert p.events.kinds("config.rejected") == ["config.rejected"]

            # The same refusal through the admin endpoint: 422 with the issues.
            status, result = await admin_json(p, "POST", "/admin/reload")
            assert status == 422 and result["outcome"] == "failure"
            assert await metric(p, "payswitch_config_last_reload_successful") == 0.0

            write_atomic(p.rules_dir / "rules.yaml", rules_text(urls, ["g2"]))
            await wait_served_by(p, {"g2"})
            _, view = await admin_json(p, "GET", "/admin/config")
            err = view["last_error"]
            assert isinstance(err, dict) and err["superseded"] is True


async def test_unchanged_rewrite_keeps_the_generation(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        text = rules_text({"g1": g["g1"].url}, ["g1"])
        async with watched_proxy(text, tmp_path) as p:
            serving = p.rt.store.current
            before = await metric(p, "payswitch_config_reloads_total", 'result="unchanged"')
            write_atomic(p.rules_dir / "rules.yaml", text)
            (p.rules_dir / "rules.yaml").touch()
            await eventually(
                lambda: (
                    (
                        p.rt.registry.get_sample_value(
                            "payswitch_config_reloads_total", {"result": "unchanged"}
                        )
                        or 0
                    )
                    > before
                )
            )
            status, body = await admin_json(p, "POST", "/admin/reload")
            assert (status, body["outcome"], body["generation"]) == (200, "unchanged", 1)
            assert p.rt.store.current is serving
            assert p.events.kinds("config.loaded") == ["config.loaded"]
            assert await metric(p, "payswitch_config_generation") == 1.0
            assert await metric(p, "payswitch_config_reloads_total", 'result="success"') == 1.0


# -- runtime state across reloads ---------------------------------------------------------


async def test_gateway_state_survives_a_reload_that_keeps_the_gateway(tmp_path: Path) -> None:
    async with gateways("g1", "g2", "g3") as g:
        urls = {n: gw.url for n, gw in g.items()}
        both = ["g1", "g2"]
        async with running_proxy(
            rules_text({"g1": urls["g1"], "g2": urls["g2"]}, both), tmp_path
        ) as p:
            assert await served_by(p, 6) == {"g1", "g2"}
            g1, g2 = p.rt.states["g1"], p.rt.states["g2"]
            status, _ = await admin_json(p, "POST", "/admin/gateways/g2/drain")
            assert status == 200
            assert await served_by(p, 4) == {"g1"}
            served = g1.requests
            assert served >= 7

            # Another weight, a new gateway and a new route order: g1 and g2 keep their state.
            text = rules_text(urls, ["g3", "g1", "g2"], weights={"g1": 2})
            (p.rules_dir / "rules.yaml").write_text(text)
            status, body = await admin_json(p, "POST", "/admin/reload")
            assert (status, body["generation"]) == (200, 2)
            assert p.rt.states["g1"] is g1 and p.rt.states["g2"] is g2
            assert g1.requests == served and g1.gateway.weight == 2
            assert g2.flags & Flag.DRAINING, "an operator's drain must survive a reload"
            assert await served_by(p, 6) == {"g1", "g3"}

            # g2 removed: its state goes; g1 at another address is another gateway.
            moved = rules_text({"g1": urls["g3"], "g3": urls["g3"]}, ["g1", "g3"])
            (p.rules_dir / "rules.yaml").write_text(moved)
            status, body = await admin_json(p, "POST", "/admin/reload")
            assert (status, body["generation"]) == (200, 3)
            assert p.rt.states.get("g2") is None
            assert p.rt.states["g1"] is not g1 and p.rt.states["g1"].requests == 0
            status, listed = await admin_json(p, "GET", "/admin/gateways")
            assert sorted(gw["name"] for gw in listed) == ["g1", "g3"]


async def test_reload_metrics_on_the_metrics_endpoint(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        urls = {n: gw.url for n, gw in g.items()}
        async with running_proxy(rules_text(urls, ["g1"]), tmp_path) as p:
            rules = p.rules_dir / "rules.yaml"
            for text in (rules_text(urls, ["g2"]), "gateways: [", rules_text(urls, ["g1"])):
                rules.write_text(text)
                await admin_json(p, "POST", "/admin/reload")
            await admin_json(p, "POST", "/admin/reload")
            assert await metric(p, "payswitch_config_generation") == 3.0
            for result, count in (("success", 3.0), ("failure", 1.0), ("unchanged", 1.0)):
                labels = f'result="{result}"'
                assert await metric(p, "payswitch_config_reloads_total", labels) == count
            assert await metric(p, "payswitch_config_last_reload_successful") == 1.0


# -- the load test: reloads many times a second lose nothing ------------------------------


@dataclass
class Tally:
    sent: int = 0
    failed: list[str] = field(default_factory=list)
    by_gateway: dict[str, int] = field(default_factory=dict)


async def payments_during(
    p: Proxy,
    publish: Callable[[int], Awaitable[None]],
    *,
    clients: int = 30,
    seconds: float = 3.0,
    max_seconds: float = 30.0,
    max_requests: int = 200_000,
    change_every: float = 0.05,
    enough: Callable[[], bool] = lambda: True,
) -> tuple[Tally, int]:
    """`clients` loops of payments while, every `change_every` seconds, `publish` puts the
    next of `load_rule_sets` in place.

    Runs for `seconds`, then on until `enough()` holds (a loaded machine reloads less
    often, so a fixed time can swap too few rules to tell), bounded by `max_seconds` and
    `max_requests`; returns the tally and how many changes were made.
    """
    tally = Tally()
    loop = asyncio.get_running_loop()
    start = loop.time()
    stopped = False
    url = p.url + "/v1/deposits"
    body = b'{"amount": 100, "currency": "EUR"}'
    timeout = aiohttp.ClientTimeout(total=10)

    async def client() -> None:
        while not stopped and tally.sent < max_requests:
            tally.sent += 1
            try:
                async with p.session.post(url, data=body, timeout=timeout) as resp:
                    await resp.read()
                    gw = resp.headers.get("X-Payswitch-Gateway", "-")
                    if resp.status != 200:
                        tally.failed.append(f"{resp.status} via {gw}")
                        continue
                    tally.by_gateway[gw] = tally.by_gateway.get(gw, 0) + 1
            except (aiohttp.ClientError, TimeoutError) as exc:
                tally.failed.append(repr(exc))

    def over() -> bool:
        elapsed = loop.time() - start
        return elapsed >= max_seconds or (elapsed >= seconds and enough())

    async def changer() -> int:
        nonlocal stopped
        changes = 0
        while not over() and tally.sent < max_requests:
            await publish(storm_step(changes))
            changes += 1
            await asyncio.sleep(change_every)
        stopped = True
        return changes

    changes = spawn(changer(), name="test-rules-changer")
    await asyncio.gather(*(client() for _ in range(clients)))
    return tally, await changes


LOAD_A = ("a1", "a2")
LOAD_B = ("b1", "b2")
DECOY = "x1"  # a live gateway only invalid rules route to: an answer from it is a leak


def load_rule_sets(urls: Mapping[str, str]) -> list[str]:
    """Rules routing to the a-gateways, invalid YAML, rules routing to the b-gateways,
    rules routing to the decoy and an unknown gateway: each valid set defines only its own
    gateways, so every swap between them removes two gateways and adds two."""
    a = rules_text({n: urls[n] for n in LOAD_A}, LOAD_A)
    b = rules_text({n: urls[n] for n in LOAD_B}, LOAD_B)
    leak = rules_text({DECOY: urls[DECOY]}, [DECOY, "ghost"])
    return [a, "gateways: {a1: [", b, leak]


def storm_step(i: int) -> int:
    """The rule set (index into `load_rule_sets`) written by the i-th change of a storm."""
    return (i + 1) % 4


MIN_RELOADS = 4  # valid swaps a storm must publish before it tells anything


def storm_enough(p: Proxy, loaded_before: int) -> Callable[[], bool]:
    """True once the storm has published `MIN_RELOADS` swaps and refused invalid rules."""

    def enough() -> bool:
        loaded = len(p.events.of("config.loaded")) - loaded_before
        return loaded >= MIN_RELOADS and bool(p.events.of("config.rejected"))

    return enough


async def check_lossless(
    p: Proxy,
    tally: Tally,
    changes: int,
    loaded_before: int,
    publish: Callable[[int], Awaitable[None]],
) -> None:
    assert tally.sent >= 500, f"too little load to tell: {tally.sent} requests"
    assert tally.failed == [], f"{len(tally.failed)} of {tally.sent} failed: {tally.failed[:5]}"
    assert set(tally.by_gateway) <= {*LOAD_A, *LOAD_B}, tally.by_gateway
    # The storm really swapped rules under load, and really offered invalid ones.
    assert set(tally.by_gateway) == {*LOAD_A, *LOAD_B}, tally.by_gateway
    loaded = len(p.events.of("config.loaded")) - loaded_before
    assert loaded >= MIN_RELOADS, f"only {loaded} reloads published during {changes} changes"
    assert p.events.of("config.rejected"), "no invalid rules were refused"
    # The last write wins, whatever the storm left serving: a change that landed while a
    # reload was running must not be lost.
    a_serving = set(p.rt.store.current.rules.gateways) == set(LOAD_A)
    await publish(2 if a_serving else 0)
    await wait_served_by(p, set(LOAD_B if a_serving else LOAD_A))


async def test_atomic_rewrites_under_load_lose_no_payment(tmp_path: Path) -> None:
    async with gateways(*LOAD_A, *LOAD_B, DECOY) as g:
        variants = load_rule_sets({n: gw.url for n, gw in g.items()})
        async with watched_proxy(variants[0], tmp_path) as p:
            before = len(p.events.of("config.loaded"))

            async def publish(i: int) -> None:
                write_atomic(p.rules_dir / "rules.yaml", variants[i])

            tally, changes = await payments_during(p, publish, enough=storm_enough(p, before))
            await check_lossless(p, tally, changes, before, publish)


async def test_configmap_swaps_under_load_lose_no_payment(tmp_path: Path) -> None:
    async with gateways(*LOAD_A, *LOAD_B, DECOY) as g:
        variants = load_rule_sets({n: gw.url for n, gw in g.items()})
        cm = ConfigMapDir(tmp_path / "rules")
        cm.root.mkdir()
        cm.publish({"rules.yaml": variants[0]})
        async with watched_proxy(variants[0], tmp_path) as p:
            before = len(p.events.of("config.loaded"))

            async def publish(i: int) -> None:
                cm.publish({"rules.yaml": variants[i]})

            tally, changes = await payments_during(p, publish, enough=storm_enough(p, before))
            await check_lossless(p, tally, changes, before, publish)


async def test_admin_reloads_under_load_lose_no_payment(tmp_path: Path) -> None:
    async with gateways(*LOAD_A, *LOAD_B, DECOY) as g:
        variants = load_rule_sets({n: gw.url for n, gw in g.items()})
        async with running_proxy(variants[0], tmp_path, watch=False) as p:
            before = len(p.events.of("config.loaded"))

            async def publish(i: int) -> None:
                write_atomic(p.rules_dir / "rules.yaml", variants[i])
                status, _ = await admin_json(p, "POST", "/admin/reload")
                assert status == (200 if i in (0, 2) else 422)

            tally, changes = await payments_during(
                p, publish, change_every=0.02, enough=storm_enough(p, before)
            )
            await check_lossless(p, tally, changes, before, publish)


# -- requests that straddle a reload ------------------------------------------------------
#
# A request keeps the gateways of the rules it started with, even those a reload removed or
# moved meanwhile; what it does with their retired states must not bring them back.


async def test_payment_whose_body_arrives_across_a_reload_is_served(tmp_path: Path) -> None:
    async with gateways("a1", "b1") as g:
        a = rules_text({"a1": g["a1"].url}, ["a1"])
        b = rules_text({"b1": g["b1"].url}, ["b1"])
        async with running_proxy(a, tmp_path) as p:
            rest = asyncio.Event()

            async def body() -> AsyncIterator[bytes]:
                yield b'{"amount": 100,'
                await rest.wait()
                yield b' "currency": "EUR"}'

            sending = spawn(p.post(data=body()), name="test-slow-payment")
            await asyncio.sleep(0.1)  # the request is in the handler, reading its body
            (p.rules_dir / "rules.yaml").write_text(b)
            status, _ = await admin_json(p, "POST", "/admin/reload")
            assert status == 200
            rest.set()
            status, headers, problem = await sending
            assert status == 200, problem
            assert headers["X-Payswitch-Gateway"] == "a1", "it started on the a1 rules"


def _in_flight(p: Proxy) -> int:
    return sum(st.in_flight for st in p.rt.states)


async def _scrape(p: Proxy) -> str:
    async with p.session.get(p.admin_url + "/metrics") as resp:
        return await resp.text()


async def test_attempt_finishing_after_its_gateway_was_removed_leaves_no_state(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2") as g:
        g["g2"].set(delay=0.4)
        urls = {n: gw.url for n, gw in g.items()}
        async with running_proxy(rules_text(urls, ["g2"]), tmp_path) as p:
            sending = spawn(p.post(), name="test-payment-on-g2")
            await eventually(lambda: _in_flight(p) == 1)
            (p.rules_dir / "rules.yaml").write_text(rules_text({"g1": urls["g1"]}, ["g1"]))
            status, _ = await admin_json(p, "POST", "/admin/reload")
            assert status == 200 and p.rt.states.get("g2") is None
            assert 'gateway="g2"' not in await _scrape(p)
            status, headers, _ = await sending
            # The payment in flight finishes where it was sent ...
            assert (status, headers["X-Payswitch-Gateway"]) == (200, "g2")
            # ... and the removed gateway's health state stays gone.
            assert 'payswitch_gateway_up{gateway="g2"}' not in await _scrape(p)


async def test_attempt_finishing_after_its_gateway_moved_keeps_the_new_health_checks(
    tmp_path: Path,
) -> None:
    check = {"g1": "health_check: {path: /health, interval: 1s}"}
    async with gateways("g1", "g2") as g:
        g["g1"].set(delay=0.4)
        urls = {n: gw.url for n, gw in g.items()}
        async with running_proxy(rules_text(urls, ["g1"], extra=check), tmp_path) as p:
            sending = spawn(p.post(), name="test-payment-on-old-g1")
            await eventually(lambda: _in_flight(p) == 1)
            moved = rules_text({"g1": urls["g2"]}, ["g1"], extra=check)
            (p.rules_dir / "rules.yaml").write_text(moved)
            status, _ = await admin_json(p, "POST", "/admin/reload")
            assert status == 200
            status, _, _ = await sending
            assert status == 200
            _, (g1,) = await admin_json(p, "GET", "/admin/gateways")
            assert g1["url"] == urls["g2"]
            assert g1["health"]["active"] is not None, "g1's active checker is gone"
