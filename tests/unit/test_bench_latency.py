"""The microsecond latency bench: its client's parsing and figures, and the table."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench import fixed_rate, latency, run


def test_the_answer_length_is_known_once_the_head_is_in() -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nServer: x\r\n\r\n"
    assert fixed_rate.answer_length(head[:20]) is None
    assert fixed_rate.answer_length(head) == len(head) + 5
    assert fixed_rate.answer_length(head + b"hel") == len(head) + 5


@pytest.mark.parametrize(
    "head",
    [b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n\r\n", b"HTTP/1.1 200 OK\r\n\r\n"],
    ids=["not-2xx", "no-length"],
)
def test_an_answer_the_client_cannot_time_is_an_error(head: bytes) -> None:
    with pytest.raises(fixed_rate.ExchangeError):
        fixed_rate.answer_length(head)


def test_percentiles_are_nearest_rank_in_microseconds() -> None:
    got = fixed_rate.percentiles([i * 1000 for i in range(1, 1001)])
    assert got == {"p50_us": 501, "p90_us": 901, "p99_us": 991, "p999_us": 1000}
    with pytest.raises(ValueError, match="no samples"):
        fixed_rate.percentiles([])


def test_the_histogram_counts_each_100_us_and_everything_slower_in_the_last_bin() -> None:
    bins = fixed_rate.histogram([0, 99_999, 100_000, 250_000, 2_899_999, 2_900_000, 10**9])
    assert len(bins) == fixed_rate.BINS == 30
    assert (bins[0], bins[1], bins[2], bins[28], bins[29]) == (2, 1, 1, 1, 2)
    assert sum(bins) == 7


def test_the_histogram_lines_head_each_bin_with_where_it_starts() -> None:
    lines = latency.histogram_lines({"envoy": [0, 3, 1], "new": [2, 0, 0]})
    assert lines[0].split() == ["ms", "0.0", "0.1", ">="]
    assert lines[1].split() == ["envoy", "0", "3", "1"]
    assert lines[2].split() == ["new", "2", "0", "0"]
    assert latency.histogram_lines({}) == []


def test_each_round_starts_with_another_target() -> None:
    names = ["direct", "envoy", "new"]
    assert [run.turned(names, i)[0] for i in range(4)] == ["direct", "envoy", "new", "direct"]
    assert sorted(run.turned(names, 2)) == sorted(names)


def test_the_table_shows_each_median_and_what_it_adds_over_direct() -> None:
    def r(p50: float, p99: float) -> dict[str, float]:
        return {"p50_us": p50, "p90_us": p50, "p99_us": p99, "p999_us": p99}

    lines = latency.table(
        {"direct": [r(90, 300), r(100, 250), r(80, 900)], "new": [r(500, 1100), r(520, 1300)]}
    )
    assert lines[1].split()[:2] == ["direct", "90"]
    assert lines[2].split()[:2] == ["new", "510"]
    assert lines[2].endswith("420 / 420 / 900 / 900")


def test_the_steal_line_sums_each_targets_rounds() -> None:
    def r(steal: float) -> dict[str, float]:
        return {"p50_us": 1, "p90_us": 1, "p99_us": 1, "p999_us": 1, "steal_ms": steal}

    per = {"direct": [r(10), r(0)], "new": [r(20), r(30)]}
    assert (
        latency.steal_line(per) == "host steal during each target's rounds, ms: direct 10, new 50"
    )
    per["new"].append({"p50_us": 1, "p90_us": 1, "p99_us": 1, "p999_us": 1})
    assert latency.steal_line(per) is None  # one round unread: no sum to show


class _Ok(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # the head and the body are two writes

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def upstream() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Ok)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1/deposits"
    server.shutdown()
    server.server_close()


def test_the_client_times_every_exchange_at_its_rate(upstream: str) -> None:
    got = fixed_rate.run(upstream, rate=100, seconds=0.3, body=b'{"a":1}')
    assert got["failed"] == 0
    assert 25 <= got["answers"] <= 32  # one every 10 ms, the first at 0 and the last at 0.3 s
    assert 0 < got["p50_us"] <= got["p90_us"] <= got["p99_us"] <= got["p999_us"]
    assert sum(got["hist"]) == got["answers"]


def test_targets_take_turns_equally_and_the_order_shifts_each_cycle() -> None:
    assert [fixed_rate.turn(n, 3) for n in range(6)] == [0, 1, 2, 1, 2, 0]
    counts = [0, 0, 0]
    for n in range(300):
        counts[fixed_rate.turn(n, 3)] += 1
    assert counts == [100, 100, 100]
    assert [fixed_rate.turn(n, 1) for n in range(3)] == [0, 0, 0]


def test_the_client_times_several_targets_in_the_same_seconds(upstream: str) -> None:
    other = upstream + "?second"
    got = fixed_rate.run_turns([upstream, other], rate=100, seconds=0.3, body=b"{}")
    assert list(got) == [upstream, other]
    for figures in got.values():
        assert figures["failed"] == 0
        # each at its own 100/s (200 a second between them, in turn), as alone
        assert 25 <= figures["answers"] <= 32
        assert 0 < figures["p50_us"] <= figures["p99_us"]


def test_paired_rounds_show_the_steal_every_target_shared() -> None:
    def r(steal: float | None) -> dict[str, float]:
        got = {"p50_us": 1.0, "p90_us": 1.0, "p99_us": 1.0, "p999_us": 1.0}
        return got if steal is None else {**got, "steal_ms": steal}

    per = {"direct": [r(10), r(5)], "new": [r(10), r(5)]}
    assert latency.host_line(per) == "host steal during the rounds, ms (every target's): 15"
    assert latency.host_line({"direct": [r(None)]}) is None


def test_the_client_runs_pinned_for_several_targets(upstream: str) -> None:
    urls = {"a": upstream, "b": upstream + "?b"}
    got = fixed_rate.measure_turns(urls, rate=100, seconds=0.3, core=0)
    assert list(got) == ["a", "b"]
    assert got["a"]["steal_ms"] == got["b"]["steal_ms"] >= 0  # one round, shared
    assert all(g["failed"] == 0 and g["answers"] >= 25 for g in got.values())
    alone = fixed_rate.measure_turns({"a": upstream}, rate=100, seconds=0.3, core=0)
    assert list(alone) == ["a"] and alone["a"]["failed"] == 0


def test_each_build_is_set_against_envoy_round_by_round() -> None:
    def r(p99: float) -> dict[str, float]:
        return {"p50_us": 1.0, "p90_us": 1.0, "p99_us": p99, "p999_us": 1.0}

    per = {
        "direct": [r(100), r(100)],
        "envoy": [r(1500), r(1900)],
        "new": [r(1400), r(1800)],
        "old": [r(1600)],  # a round short: not compared
    }
    assert latency.versus_lines(per, paired=True) == [
        "new p99 against envoy's, round by round: at or below it in 2 of 2,",
        "  median difference -100 us (each round's targets ran through the same seconds)",
    ]
    assert latency.versus_lines(per, paired=False)[1].endswith("ran one after another)")
    assert latency.versus_lines({"direct": [r(1)], "new": [r(2)]}, paired=True) == []
