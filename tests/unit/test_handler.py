"""Tests for proxy.handler: every way a request ends, through a real listener and real
simulated gateways — refused before routing, replayed, dispatched, or failed closed."""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import orjson
import pytest

from proxy.aio import spawn
from proxy.events import Event
from proxy.upstream.state import Flag
from tests.support import Proxy, eventually, gateways, running_proxy


def rules(urls: dict[str, str]) -> str:
    gws = "\n".join(f"  {n}: {{url: '{u}', region: eu, provider: p}}" for n, u in urls.items())
    return f"""
gateways:
{gws}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits, methods: [POST]}}
    region: {{default: eu}}
    gateways: [{", ".join(urls)}]
    max_body: 64
    idempotency: {{header: Idempotency-Key}}
  - name: status
    match: {{path_prefix: /v1/status, methods: [GET]}}
    region: {{default: eu}}
    gateways: [{", ".join(urls)}]
"""


async def raw(p: Proxy, head: bytes) -> int:
    host, port = p.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(head)
    await writer.drain()
    line = await reader.readline()
    writer.close()
    return int(line.split()[1])


@pytest.mark.parametrize(
    ("target", "status"),
    [
        (b"http://example.com/v1/deposits", 400),
        (b"/v1/deposits/../admin", 400),
        (b"/v1/./deposits", 400),
        (b"/nowhere", 404),
    ],
    ids=["absolute-form", "dot-dot", "dot", "no-route"],
)
async def test_requests_refused_before_routing(tmp_path: Path, target: bytes, status: int) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            head = b"POST " + target + b" HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"
            assert await raw(p, head) == status
            assert not g["g1"].requests()


async def test_body_over_the_route_cap_is_413_and_never_sent(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            status, _, body = await p.post(data=b"x" * 100)
            assert status == 413
            assert orjson.loads(body)["route"] == "deposits"
            assert not g["g1"].requests()


async def test_dispatched_answer_names_gateway_and_transaction(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            # The transaction id is payswitch's own, whatever the client sends.
            status, headers, _ = await p.request(
                "GET", "/v1/status", headers={"X-Payswitch-Transaction-Id": "txn-given"}
            )
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "g1"
            txn = headers["X-Payswitch-Transaction-Id"]
            assert txn != "txn-given"
            [seen] = g["g1"].requests()
            assert seen.headers["X-Payswitch-Transaction-Id"] == txn
            assert seen.headers["X-Payswitch-Attempt-Id"]
            assert p.events.kinds("transaction.") == [
                "transaction.pending",
                "transaction.succeeded",
            ]


class _PendingWatch(list[Event]):
    """The recorded events, noting what each pending one found in flight when it came."""

    def __init__(self, p: Proxy) -> None:
        super().__init__()
        self.p = p
        self.found: list[list[bool] | None] = []

    def append(self, event: Event) -> None:
        if event.kind == "transaction.pending":
            live = self.p.rt.payments.in_flight.get(str(event.fields["transaction_id"]))
            sent = None if live is None else [a.progress.reached_gateway for a in live[0].attempts]
            self.found.append(sent)
        super().append(event)


async def test_pending_event_is_built_once_the_request_is_on_its_way(tmp_path: Path) -> None:
    # Building and queueing the event costs the request nothing: on a kept-alive
    # connection the first attempt is written before it (a new one is still connecting).
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            assert (await p.request("GET", "/v1/status"))[0] == 200
            p.events.events = watch = _PendingWatch(p)
            for _ in range(3):
                assert (await p.request("GET", "/v1/status"))[0] == 200
            assert watch.found == [[True]] * 3
            assert (
                p.events.kinds("transaction.")
                == [
                    "transaction.pending",
                    "transaction.succeeded",
                ]
                * 3
            )


async def test_pending_event_comes_first_when_the_answer_needs_no_wait(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            p.rt.states["g1"].set_flag(Flag.DRAINING, "maintenance")
            for _ in range(2):
                assert (await p.request("GET", "/v1/status"))[0] == 503
            pending = p.events.of("transaction.pending")
            assert (
                p.events.kinds("transaction.")
                == [
                    "transaction.pending",
                    "transaction.failed",
                ]
                * 2
            )
            assert len({e.fields["transaction_id"] for e in pending}) == 2


async def test_the_gateway_connection_wakes_the_retry_loop_while_it_waits(
    tmp_path: Path,
) -> None:
    # The answer's connection tells the waiting retry loop directly (proxy.aio.first_done):
    # the waker is set on the current attempt for the wait, and gone after it.
    async with gateways("g1") as g:
        g["g1"].set(delay=0.2)
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            answer = spawn(p.request("GET", "/v1/status"), name="status")
            await eventually(lambda: bool(p.rt.payments.in_flight))
            [(dispatch, _)] = p.rt.payments.in_flight.values()
            await eventually(lambda: bool(dispatch.attempts))
            [attempt] = dispatch.attempts
            await eventually(lambda: attempt.progress.waker is not None)
            assert (await answer)[0] == 200
            assert attempt.progress.waker is None


async def test_replay_is_answered_without_dispatch(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            key = {"Idempotency-Key": f"k-{uuid.uuid4().hex}"}
            first = await p.post(data=b"{}", headers=key)
            again = await p.post(data=b"{}", headers=key)
            assert first[0] == again[0] == 200
            assert again[1]["Idempotent-Replayed"] == "true"
            assert len(g["g1"].requests()) == 1


async def test_no_gateway_left_fails_closed_and_pages_once(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            p.rt.states["g1"].set_flag(Flag.DRAINING, "maintenance")
            for _ in range(3):
                status, _, body = await p.request("GET", "/v1/status")
                assert status == 503
                problem = orjson.loads(body)
                assert problem["tried"] == [{"gateway": "g1", "outcome": "skipped:draining"}]
            assert p.events.kinds("gateway.all_down") == ["gateway.all_down"]
            assert not g["g1"].requests()


async def test_gateway_5xx_for_a_payment_is_unknown_not_failed(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        g["g1"].set(mode="status", status=500)
        async with running_proxy(rules({"g1": g["g1"].url}), tmp_path) as p:
            status, _, _ = await p.post(data=b"{}")
            assert status == 500
            assert p.events.kinds("transaction.unknown") == ["transaction.unknown"]
