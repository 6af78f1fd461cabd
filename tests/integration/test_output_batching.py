"""Per-request output (access log, transaction events) is written between requests.

The handler flushes the batched output as soon as no request waits on a gateway, so the
encode and hand-off never land, on a linger timer, in the middle of another request. Under
load the batches still gather: while a request is in flight, what others finish waits.
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

from proxy.aio import spawn
from proxy.events import StreamSink
from proxy.logs import LineWriter
from proxy.sim import FakeGateway
from tests.support import Proxy, eventually, gateways, running_proxy

RULES = """
gateways:
  fast: {{url: '{fast}', region: eu}}
  slow: {{url: '{slow}', region: eu}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [fast]
  - name: payouts
    match: {{path_prefix: /v1/payouts, methods: [POST]}}
    region: {{default: eu}}
    gateways: [slow]
    timeouts: {{per_try: 20s, total: 30s}}
"""


#: Seconds the payout's gateway takes: what is checked while it is in flight has that long.
SLOW = 5.0


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_bytes().splitlines()] if path.exists() else []


def transactions(events: Path) -> list[tuple[object, object]]:
    """(kind, transaction id) of every transaction event written so far."""
    out = []
    for e in lines(events):
        fields = e["fields"]
        assert isinstance(fields, dict)
        if str(e["kind"]).startswith("transaction."):
            out.append((e["kind"], fields["transaction_id"]))
    return out


def access(log: Path) -> list[object]:
    return [e["transaction_id"] for e in lines(log) if e.get("log") == "access"]


@contextmanager
def access_log_to(p: Proxy, path: Path) -> Iterator[None]:
    """The proxy's access log written to `path` instead of stdout."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    writer = LineWriter(fd, name="access-test")
    log = p.rt.access_log
    assert log is not None
    log._writer = writer
    try:
        yield
    finally:
        writer.close(5.0)
        os.close(fd)


@asynccontextmanager
async def proxy_with_files(
    tmp_path: Path,
) -> AsyncIterator[tuple[Proxy, Path, Path, dict[str, FakeGateway]]]:
    events, log = tmp_path / "events.jsonl", tmp_path / "access.jsonl"
    async with gateways("fast", "slow") as g:
        rules = RULES.format(fast=g["fast"].url, slow=g["slow"].url)
        async with running_proxy(rules, tmp_path, access_log=True, events=str(events)) as p:
            with access_log_to(p, log):
                # Lingers far longer than any test: only the idle flush can write a line.
                assert p.rt.access_log is not None
                p.rt.access_log._linger = 60.0
                sinks = [s for s in p.rt.events.sinks if isinstance(s, StreamSink)]
                assert [s.name for s in sinks] == ["file"]
                for sink in sinks:
                    sink.linger = 60.0
                for flush in p.rt.idle_flush:
                    flush()  # what start-up emitted, with the old linger
                yield p, events, log, g


async def test_a_lone_request_s_output_is_written_once_it_is_answered(tmp_path: Path) -> None:
    async with proxy_with_files(tmp_path) as (p, events, log, _):
        status, headers, _ = await p.post("/v1/deposits")
        assert status == 200
        txn = headers["X-Payswitch-Transaction-Id"]
        want = [("transaction.pending", txn), ("transaction.succeeded", txn)]
        await eventually(lambda: transactions(events) == want, within=5.0)
        await eventually(lambda: access(log) == [txn], within=5.0)


async def test_output_waits_in_its_batch_while_another_request_is_in_flight(
    tmp_path: Path,
) -> None:
    async with proxy_with_files(tmp_path) as (p, events, log, g):
        g["slow"].set(delay=SLOW)
        slow = spawn(p.post("/v1/payouts"), name="slow-payout")
        await eventually(lambda: bool(g["slow"].requests()), within=5.0)

        status, headers, _ = await p.post("/v1/deposits")
        assert status == 200
        fast = headers["X-Payswitch-Transaction-Id"]
        await asyncio.sleep(0.3)
        assert transactions(events) == []  # batched: the payout is still at its gateway
        assert access(log) == []

        status, headers, _ = await slow
        assert status == 200
        txn = headers["X-Payswitch-Transaction-Id"]
        await eventually(lambda: len(transactions(events)) == 4, within=5.0)
        assert set(transactions(events)) == {
            ("transaction.pending", txn),
            ("transaction.succeeded", txn),
            ("transaction.pending", fast),
            ("transaction.succeeded", fast),
        }
        await eventually(lambda: sorted(map(str, access(log))) == sorted([fast, txn]))


async def test_a_full_batch_is_written_without_waiting_for_idle(tmp_path: Path) -> None:
    async with proxy_with_files(tmp_path) as (p, events, _, g):
        [sink] = [s for s in p.rt.events.sinks if isinstance(s, StreamSink)]
        sink.batch_max = 3
        g["slow"].set(delay=SLOW)
        slow = spawn(p.post("/v1/payouts"), name="slow-payout")
        await eventually(lambda: bool(g["slow"].requests()), within=5.0)
        status, _, _ = await p.post("/v1/deposits")  # pending, pending, succeeded
        assert status == 200
        await eventually(lambda: len(transactions(events)) == 3, within=SLOW - 1)
        assert not slow.done()  # the payout still in flight: written for batch_max alone
        assert (await slow)[0] == 200
