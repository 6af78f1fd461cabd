"""The throughput bench's inputs and bookkeeping: body, rules, nginx configs, wrk parsing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import hey, host, nginx, procs, report, run, tools, wrk
from bench.report import TargetResult
from bench.targets import bench_rules, write_rules
from proxy.config.load import load_rules

WRK_CLEAN = """\
Running 5s test @ http://127.0.0.1:41235/v1/deposits
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   540.12us  120.33us   5.12ms   90.12%
    Req/Sec    72.12k     3.21k   78.00k    80.00%
  Latency Distribution
     50%  520.00us
     75%  600.00us
     90%  700.00us
     99%    1.20ms
  361234 requests in 5.01s, 60.12MB read
Requests/sec:  72100.12
Transfer/sec:     12.00MB
"""

WRK_ERRORS = """\
Running 10s test @ http://127.0.0.1:41236/v1/deposits
  1 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10s   300.00ms   1.99s    70.00%
    Req/Sec    40.00     10.00    60.00     75.00%
  Latency Distribution
     50%    1.05s
     75%    1.30s
     90%    1.70s
     99%    1.98s
  400 requests in 10.02s, 60.00KB read
  Socket errors: connect 0, read 3, write 1, timeout 12
  Non-2xx or 3xx responses: 250
Requests/sec:     39.92
Transfer/sec:      5.99KB
"""


def result(name: str, rps: float, *, requests: int = 1000, non_2xx: int = 0) -> TargetResult:
    run = wrk.WrkResult(
        requests=requests,
        seconds=1.0,
        rps=rps,
        p50_ms=1.0,
        p99_ms=2.0,
        non_2xx=non_2xx,
        socket_errors=0,
    )
    return TargetResult(name=name, title=name, runs=[run])


def test_post_body_is_the_212_byte_json_of_the_anchors() -> None:
    body = wrk.post_body()
    assert len(body) == 212
    assert isinstance(json.loads(body), dict)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (WRK_CLEAN, (361234, 72100.12, 0.52, 1.2, 0, 0)),
        (WRK_ERRORS, (400, 39.92, 1050.0, 1980.0, 250, 16)),
    ],
    ids=["microseconds-no-errors", "seconds-with-errors"],
)
def test_wrk_report_parsed_in_milliseconds(
    text: str, expected: tuple[int, float, float, float, int, int]
) -> None:
    got = wrk.parse(text)
    requests, rps, p50_ms, p99_ms, non_2xx, socket_errors = expected
    assert (got.requests, got.rps, got.non_2xx, got.socket_errors) == (
        requests,
        rps,
        non_2xx,
        socket_errors,
    )
    assert got.p50_ms == pytest.approx(p50_ms)
    assert got.p99_ms == pytest.approx(p99_ms)


def test_wrk_report_without_latency_distribution_is_rejected() -> None:
    text = WRK_CLEAN.replace("     99%    1.20ms\n", "")
    with pytest.raises(wrk.WrkOutputError):
        wrk.parse(text)


def test_bench_rules_point_every_gateway_at_the_running_upstream(tmp_path: Path) -> None:
    url = "http://127.0.0.1:45678"
    assert "18080" not in bench_rules(url)
    rules = load_rules([write_rules(url, tmp_path / "rules")])
    assert [g.port for g in rules.gateways.values()] == [45678]
    route = rules.routes[0]
    assert route.match.path_prefix == "/v1/deposits"
    assert route.gateways == ("upstream",)


@pytest.mark.parametrize("kind", ["upstream", "proxy"])
def test_nginx_configs_pass_nginx_t(tmp_path: Path, kind: str) -> None:
    if nginx.binary() is None:
        tools.ensure()  # installs nginx as `make bench` would, or fails saying why
    assert nginx.binary() is not None, "nginx is needed to check the bench's nginx configs"
    conf = (
        nginx.upstream_conf(tmp_path, 41000)
        if kind == "upstream"
        else nginx.proxy_conf(tmp_path, 41001, 41000)
    )
    argv = [str(nginx.binary()), *nginx.prepare(tmp_path, conf), "-t"]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=30, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize(
    ("non_2xx", "served"),
    [(0, True), (500, True), (501, False), (1000, False)],
    ids=["clean", "half-failed", "most-failed", "all-failed"],
)
def test_target_serves_unless_most_requests_fail(non_2xx: int, served: bool) -> None:
    assert (result("t", 100.0, non_2xx=non_2xx).failure() is None) is served


def test_ratios_skip_failed_targets() -> None:
    results = {
        "direct": result("direct", 80_000.0),
        "nginx": result("nginx", 50_000.0),
        "floor": result("floor", 10_000.0),
        "payswitch": result("payswitch", 9_000.0, non_2xx=900),
    }
    got = report.ratios(results)
    assert got["floor / direct"] == pytest.approx(0.125)
    assert got["payswitch / floor"] is None
    results["payswitch"] = result("payswitch", 9_000.0)
    assert report.ratios(results)["payswitch / floor"] == pytest.approx(0.9)


@pytest.mark.parametrize(
    ("present_after", "calls"),
    [(0, 1), (2, 3), (3, 4), (99, 4)],
    ids=["first-install", "after-update", "plain-nginx", "never"],
)
def test_missing_tools_installed_through_apt_in_order(
    monkeypatch: pytest.MonkeyPatch, present_after: int, calls: int
) -> None:
    ran: list[Sequence[str]] = []
    monkeypatch.setattr(tools, "missing", lambda: [] if len(ran) > present_after else ["wrk"])

    def fake_apt(argv: Sequence[str]) -> int:
        ran.append(argv)
        return 0

    if present_after == 99:
        with pytest.raises(tools.ToolError):
            tools.ensure(run=fake_apt)
    else:
        tools.ensure(run=fake_apt)
    assert ran == list(tools.INSTALLS[:calls])


CORES = {
    "one process: the proxy core": ([], "0"),
    "other options only": (["--access-log=off"], "0"),
    "two workers, = form": (["--workers=2"], "0,1"),
    "two workers, two words": (["--workers", "2"], "0,1"),
    "more workers than cores": (["--workers=64"], None),
}


@pytest.mark.parametrize(("args", "cores"), CORES.values(), ids=CORES)
def test_payswitch_cores(args: list[str], cores: str | None) -> None:
    import os

    from bench.targets import payswitch_cores

    expected = cores or ",".join(str(i) for i in range(os.cpu_count() or 1))
    assert payswitch_cores(args) == expected


HEY_OUT = """
Summary:
  Total:\t5.0021 secs
  Requests/sec:\t399.8

Latency distribution:
  10%% in 0.0003 secs
  50%% in %s secs
  99%% in %s secs

Status code distribution:
  [200]\t1999 responses
  [502]\t1 responses
"""


def test_steady_rounds_are_kept_as_their_median() -> None:
    runs = [
        hey.parse(HEY_OUT % (p50, p99))
        for p50, p99 in [("0.0004", "0.0009"), ("0.0006", "0.0030"), ("0.0005", "0.0011")]
    ]
    assert (runs[0].p50_ms, runs[0].p99_ms, runs[0].ok, runs[0].other) == pytest.approx(
        (0.4, 0.9, 1999, 1)
    )
    got = hey.median_of(runs)
    assert (got.p50_ms, got.p99_ms) == pytest.approx((0.5, 1.1))  # one slow round moves neither
    assert (got.ok, got.other, got.rounds) == (3 * 1999, 3, 3)
    with pytest.raises(ValueError, match="no steady run"):
        hey.median_of([])


def test_steady_table_says_it_shows_medians_of_rounds() -> None:
    results = {name: result(name, 1000.0) for name in ("direct", "payswitch")}
    results["direct"].steady = hey.SteadyResult(p50_ms=0.2, p99_ms=0.5, ok=10, other=0, rounds=5)
    results["payswitch"].steady = hey.SteadyResult(p50_ms=0.5, p99_ms=0.9, ok=10, other=0, rounds=5)
    table = report.steady_table(results, 400)
    assert "median of 5 rounds" in table
    assert "0.30" in table and "0.40" in table  # what payswitch adds at p50 and p99


def test_steal_is_read_from_the_cpu_line(tmp_path: Path) -> None:
    stat = tmp_path / "stat"
    hz = os.sysconf("SC_CLK_TCK")
    stat.write_text(
        f"cpu  2128603 3282 332738 5572321 14431 0 89443 {3 * hz} 0 0\n"
        "cpu0 1 2 3 4 5 6 7 999 0 0\nintr 1 2 3\n",
        encoding="ascii",
    )
    assert host.steal_seconds(stat) == pytest.approx(3.0)
    stat.write_text("cpu  1 2 3 4\n", encoding="ascii")  # a kernel without the field
    assert host.steal_seconds(stat) is None
    assert host.steal_seconds(tmp_path / "absent") is None
    assert host.steal_between(1.0, 1.25) == pytest.approx(0.25)
    assert host.steal_between(None, 1.0) is None
    assert host.steal_seconds() is not None  # this machine's own counter: Linux says it
    done, stolen = host.run_counting_steal(
        [sys.executable, "-c", "print('ok')"], capture_output=True
    )
    assert (done.returncode, done.stdout, stolen is not None) == (0, "ok\n", True)
    assert stolen is not None and stolen >= 0


def test_steady_table_shows_the_steal_during_each_targets_rounds() -> None:
    rounds = [
        hey.SteadyResult(p50_ms=0.5, p99_ms=0.9, ok=10, other=0, steal_ms=steal)
        for steal in (20.0, 0.0, 30.0)
    ]
    assert hey.median_of(rounds).steal_ms == pytest.approx(50.0)  # summed, not a median
    unknown = [*rounds, hey.SteadyResult(p50_ms=0.5, p99_ms=0.9, ok=10, other=0)]
    assert hey.median_of(unknown).steal_ms is None  # one round unknown: the sum is too
    results = {name: result(name, 1000.0) for name in ("direct", "payswitch")}
    results["direct"].steady = hey.SteadyResult(
        p50_ms=0.2, p99_ms=0.5, ok=10, other=0, rounds=5, steal_ms=None
    )
    results["payswitch"].steady = hey.median_of(rounds)
    lines = report.steady_table(results, 400).splitlines()
    assert lines[1].split()[-2:] == ["steal", "ms"]
    assert lines[3].split()[-1] == "-"  # direct: unknown
    assert lines[4].split()[-1] == "50"
    assert lines[-2].startswith("steal ms: CPU time the hypervisor took")
    assert max(len(line) for line in lines) <= 100


@pytest.mark.parametrize(
    ("argv", "seconds", "rounds"),
    [
        ([], 5.0, 5),
        (["--quick"], 3.0, 1),
        (["--steady", "0"], 0.0, 5),
        (["--steady-rounds", "3"], 5.0, 3),
    ],
)
def test_steady_rate_defaults(argv: list[str], seconds: float, rounds: int) -> None:
    args = run.parse_args(argv)
    assert (args.steady, args.steady_rounds) == (seconds, rounds)


@pytest.mark.parametrize("argv", [["--steady-rounds", "0"], ["--steady", "0.5"]])
def test_steady_rate_options_are_checked(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        run.parse_args(argv)


def paired_round(p50: float, p99: float, failed: int = 0) -> dict[str, float]:
    return {"p50_us": p50, "p90_us": p50, "p99_us": p99, "p999_us": p99, "failed": failed}


def test_paired_rounds_are_kept_as_their_median_with_the_shared_steal() -> None:
    got = report.paired_median(
        [paired_round(500, 1200), paired_round(520, 9000, failed=1), paired_round(510, 1300)],
        steal_ms=40.0,
    )
    assert (got["p50_us"], got["p99_us"]) == (510, 1300)  # one stalled round moves neither
    assert (got["rounds"], got["failed"], got["steal_ms"]) == (3, 1, 40.0)
    assert "steal_ms" not in report.paired_median([paired_round(1, 1)], steal_ms=None)
    with pytest.raises(ValueError, match="no paired round"):
        report.paired_median([], None)


def test_paired_table_shows_what_each_adds_through_the_same_seconds() -> None:
    results = {name: result(name, 1000.0) for name in ("direct", "envoy", "payswitch")}
    results["direct"].paired = report.paired_median([paired_round(60, 150)], 25.0)
    results["envoy"].paired = report.paired_median([paired_round(470, 1400)], 25.0)
    results["payswitch"].paired = report.paired_median([paired_round(480, 1500)], 25.0)
    lines = report.paired_table(results, 400).splitlines()
    assert "400 POST/s to each target in turn; median of 1 round(s)" in lines[0]
    assert lines[3].split()[-3:] == ["-", "-", "0"]  # direct adds nothing to itself
    assert lines[4].split()[-3:] == ["410", "1250", "0"]
    assert lines[5].split()[-3:] == ["420", "1350", "0"]
    assert "host steal during these rounds: 25 ms" in lines[-2]
    assert max(len(line) for line in lines) <= 100
    assert results["payswitch"].as_dict()["paired"]["p99_us"] == 1500


@pytest.mark.parametrize(
    ("argv", "rounds"), [([], 5), (["--quick"], 1), (["--paired-rounds", "0"], 0)]
)
def test_paired_rounds_default_and_can_be_skipped(argv: list[str], rounds: int) -> None:
    assert run.parse_args(argv).paired_rounds == rounds
    with pytest.raises(SystemExit):
        run.parse_args(["--paired-rounds", "-1"])


def test_free_ports_never_hands_out_a_port_twice() -> None:
    """A listener and its admin port taken one after the other must differ: the ports are
    drawn at random from below the ephemeral range, so without memory two draws in a few
    hundred would meet."""
    ports = [procs.free_port() for _ in range(500)]
    assert len(set(ports)) == len(ports)
    first = procs.free_ports(3)
    assert not {first, first + 1, first + 2} & set(ports)


def test_neighbours_are_the_services_answering_beside_the_bench() -> None:
    import socket

    with socket.socket() as listening:
        listening.bind(("127.0.0.1", procs.free_port()))
        listening.listen()
        open_port = listening.getsockname()[1]
        closed_port = procs.free_port()
        found = host.neighbours([("Redis", open_port), ("the Kafka broker", closed_port)])
    assert found == ["Redis"]
    line = host.neighbours_line(found)
    assert line is not None and "Redis" in line and "make services-stop" in line
    assert "it shares the CPU" in line
    both = host.neighbours_line(["Redis", "the Kafka broker"])
    assert both is not None and "Redis and the Kafka broker" in both and "they share" in both
    assert host.neighbours_line([]) is None
    names = [name for name, _ in host.services_for_tests()]
    assert names == ["Redis", "the Kafka broker"]


def test_round_by_round_counts_the_rounds_won_and_the_median_difference() -> None:
    assert report.round_by_round([1.0, 5.0, 3.0], [2.0, 4.0, 3.0]) == (2, 3, 0.0)
    assert report.round_by_round([1.0, 1.0], [3.0, 2.0]) == (2, 2, -1.5)
    # rounds that did not pair up (a target failed half-way) say nothing
    assert report.round_by_round([1.0, 2.0], [1.0]) is None
    assert report.round_by_round([], []) is None
    assert report.versus_line("a", "b", None, "us", ".0f", "together") is None
    assert report.versus_line("a", "b", (3, 5, -40.0), "us", ".0f", "together") == (
        "a p99 against b's, round by round: at or below it in 3 of 5,\n"
        "  median difference -40 us (each round's targets ran together)"
    )


def test_both_steady_tables_set_payswitch_against_envoy_round_by_round() -> None:
    results = {name: result(name, 1000.0) for name in ("direct", "envoy", "payswitch")}
    results["envoy"].title = "Envoy, 1 worker"
    for name, p99s in (("direct", (0.3, 0.3)), ("envoy", (1.7, 1.2)), ("payswitch", (1.5, 1.3))):
        rounds = [hey.SteadyResult(p50_ms=0.5, p99_ms=p, ok=10, other=0) for p in p99s]
        results[name].steady, results[name].steady_rounds = hey.median_of(rounds), rounds
    for name, p99s in (
        ("direct", (150, 160)),
        ("envoy", (1400, 2000)),
        ("payswitch", (1300, 2100)),
    ):
        figures = [paired_round(400, p) for p in p99s]
        results[name].paired = report.paired_median(figures, 25.0)
        results[name].paired_rounds = figures
    steady = report.steady_table(results, 400).splitlines()
    at = steady.index(
        "payswitch p99 against Envoy, 1 worker's, round by round: at or below it in 1 of 2,"
    )
    assert steady[at + 1] == (
        "  median difference -0.05 ms (each round's targets ran one after another)"
    )
    paired = report.paired_table(results, 400).splitlines()
    at = paired.index(
        "payswitch p99 against Envoy, 1 worker's, round by round: at or below it in 1 of 2,"
    )
    assert paired[at + 1] == (
        "  median difference +0 us (each round's targets ran through the same seconds)"
    )
    assert max(len(line) for line in steady + paired) <= 100
    doc = results["payswitch"].as_dict()
    assert [r["p99_ms"] for r in doc["steady_rounds"]] == [1.5, 1.3]
    assert [r["p99_us"] for r in doc["paired_rounds"]] == [1300, 2100]
    # without Envoy, or with its rounds missing, no such line
    results["envoy"].steady_rounds = []
    assert "round by round" not in report.steady_table(results, 400)
    del results["envoy"]
    assert "round by round" not in report.paired_table(results, 400)
