"""The routing proxy end to end: real sockets, real simulated gateways."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import orjson
import pytest

from proxy.sim import Behaviour
from proxy.upstream.state import Flag
from tests.support import eventually, gateways, running_proxy


def rules(
    gws: dict[str, str],
    *,
    regions: dict[str, str],
    route_extra: str = "",
    names: list[str] | None = None,
) -> str:
    lines = ["gateways:"]
    for name, url in gws.items():
        lines.append(f"  {name}: {{url: '{url}', region: {regions[name]}}}")
    route_gws = ", ".join(names or list(gws))
    present = {regions[n] for n in (names or list(gws))}
    fallback = "{eu: [us], us: [eu]}" if present == {"eu", "us"} else "{}"
    lines += [
        "routes:",
        "  - name: deposits",
        "    match: {path_prefix: /v1/deposits, methods: [POST]}",
        f"    region: {{header: X-Region, default: eu, fallback: {fallback}}}",
        f"    gateways: [{route_gws}]",
        "    timeouts: {per_try: 300ms, total: 2s}",
    ]
    lines += ["    " + line for line in route_extra.strip().splitlines()] if route_extra else []
    lines += [
        "  - name: lookups",
        "    match: {path_prefix: /v1/payments, methods: [GET]}",
        f"    region: {{default: eu, fallback: {fallback}}}",
        f"    gateways: [{route_gws}]",
        "    timeouts: {per_try: 200ms, total: 600ms}",
        "    retry: {attempts: 3, on: [connect-failure, timeout, reset, 503]}",
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, "eu1"), ("us", "us1"), ("US ", "us1"), ("mars", "eu1")],
    ids=["default", "header", "case-and-space", "unknown-region-uses-default"],
)
async def test_region_from_header_else_default(
    tmp_path: Path, header: str | None, expected: str
) -> None:
    async with gateways("eu1", "us1") as g:
        text = rules({n: gw.url for n, gw in g.items()}, regions={"eu1": "eu", "us1": "us"})
        async with running_proxy(text, tmp_path) as p:
            hdrs = {"X-Region": header} if header else {}
            status, headers, _ = await p.post(headers=hdrs)
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == expected
            assert len(g[expected].requests()) == 1


async def test_fallback_region_when_home_region_is_down(tmp_path: Path) -> None:
    async with gateways("eu1", "eu2", "us1") as g:
        text = rules(
            {n: gw.url for n, gw in g.items()}, regions={"eu1": "eu", "eu2": "eu", "us1": "us"}
        )
        async with running_proxy(text, tmp_path) as p:
            await g["eu1"].down()
            await g["eu2"].down()
            for _ in range(5):
                status, headers, _ = await p.post()
                assert status == 200
                assert headers["X-Payswitch-Gateway"] == "us1"


async def test_refused_gateway_next_answers_with_zero_client_errors(tmp_path: Path) -> None:
    async with gateways("g1", "g2", "g3") as g:
        text = rules({n: gw.url for n, gw in g.items()}, regions=dict.fromkeys(g, "eu"))
        async with running_proxy(text, tmp_path) as p:
            await g["g1"].down()
            results = await asyncio.gather(*(p.post() for _ in range(60)))
            assert [r[0] for r in results] == [200] * 60
            assert {r[1]["X-Payswitch-Gateway"] for r in results} == {"g2", "g3"}
            assert not g["g1"].requests()
            # Refused connections provably carried nothing: each payment charged once.
            assert g["g2"].ledger.charged_twice() == 0


async def test_hanging_gateway_next_answers_within_per_try_plus_its_own_time(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2") as g:
        g["g1"].set(mode="hang", charge=False)
        text = rules(
            {n: gw.url for n, gw in g.items()},
            regions=dict.fromkeys(g, "eu"),
            route_extra="retry: {attempts: 2, on: [connect-failure, timeout], after_ambiguous: any-gateway}",
            names=["g1", "g2"],
        )
        async with running_proxy(text, tmp_path) as p:
            # SWRR with equal weights starts on g1: the first request must fail over.
            t0 = time.monotonic()
            status, headers, _ = await p.post()
            elapsed = time.monotonic() - t0
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "g2"
            assert headers["X-Payswitch-Attempts"] == "2"
            assert 0.3 <= elapsed < 0.3 + 0.25


async def test_after_ambiguous_never_does_not_resend_a_post_after_timeout(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        g["g1"].set(mode="hang")
        text = rules(
            {n: gw.url for n, gw in g.items()},
            regions=dict.fromkeys(g, "eu"),
            route_extra="retry: {attempts: 3, on: [connect-failure, timeout, 503], after_ambiguous: never}\ntimeouts: {per_try: 200ms, total: 700ms}",
        )
        text = text.replace("    timeouts: {per_try: 300ms, total: 2s}\n", "", 1)
        async with running_proxy(text, tmp_path) as p:
            status, _headers, body = await p.post()
            assert status == 504
            problem = orjson.loads(body)
            assert problem["title"] == "Payment outcome unknown"
            assert [t["gateway"] for t in problem["tried"] if t["gateway"] != "-"] == ["g1"]
            assert not g["g2"].requests(), "a POST must not be resent after an ambiguous timeout"
            assert len(g["g1"].ledger.charges) == 1
            assert p.events.kinds("transaction.") == ["transaction.pending", "transaction.unknown"]


async def test_get_is_retried_after_timeout_regardless_of_policy(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        g["g1"].set(mode="hang")
        text = rules({n: gw.url for n, gw in g.items()}, regions=dict.fromkeys(g, "eu"))
        async with running_proxy(text, tmp_path) as p:
            status, headers, _ = await p.request("GET", "/v1/payments/pay_1", data=None)
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "g2"


async def test_hop_by_hop_headers_are_stripped_and_forwarding_headers_added(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        text = rules({"g1": g["g1"].url}, regions={"g1": "eu"})
        async with running_proxy(text, tmp_path) as p:
            status, _, _ = await p.post(
                "/v1/deposits?x=1&y=%2F",
                headers={
                    "Connection": "keep-alive, X-Secret-Hop",
                    "X-Secret-Hop": "1",
                    "Keep-Alive": "timeout=5",
                    "TE": "trailers",
                    "Proxy-Authorization": "Basic abc",
                    "X-Custom": "kept",
                    "X-Forwarded-For": "10.9.8.7",
                },
            )
            assert status == 200
            seen = g["g1"].requests()[0]
            names = {k.lower() for k in seen.headers}
            for hop in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
                assert hop not in names
            assert seen.headers["X-Custom"] == "kept"
            assert seen.headers["X-Forwarded-For"] == "127.0.0.1"  # an untrusted peer's is replaced
            assert seen.headers["X-Forwarded-Proto"] == "http"
            assert seen.headers["X-Forwarded-Host"].startswith("127.0.0.1:")
            assert seen.path == "/v1/deposits?x=1&y=%2F"
            assert seen.body == b'{"amount": 100, "currency": "EUR"}'
            assert "X-Payswitch-Attempt-Id" in seen.headers
            assert "X-Payswitch-Transaction-Id" in seen.headers


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_route_cap_gets_413(tmp_path: Path, chunked: bool) -> None:
    async with gateways("g1") as g:
        text = rules({"g1": g["g1"].url}, regions={"g1": "eu"}, route_extra="max_body: 1KiB")
        async with running_proxy(text, tmp_path) as p:
            big = b"x" * 2048

            async def gen() -> object:
                yield big[:1000]
                yield big[1000:]

            data: object = gen() if chunked else big
            status, _, body = await p.post(data=data)
            assert status == 413
            assert orjson.loads(body)["title"] == "Request body too large"
            assert not g["g1"].requests()
            status, _, _ = await p.post(data=b"x" * 1024)
            assert status == 200


async def test_paths_match_decoded_are_forwarded_as_sent_and_dot_segments_refused(
    tmp_path: Path,
) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}, regions={"g1": "eu"}), tmp_path) as p:
            status, _, _ = await p.post("/v1/%64eposits/a%20b?x=1")
            assert status == 200
            assert [s.path for s in g["g1"].requests("/")] == ["/v1/%64eposits/a%20b?x=1"]
            for sneaky in ("/v1/deposits/../admin", "/v1/deposits/%2e%2e/admin", "/v1/deposits/."):
                status, _, body = await p.post(sneaky)
                assert status == 400, sneaky
                assert "segments" in orjson.loads(body)["detail"]
            assert len(g["g1"].requests("/")) == 1


async def test_a_client_leaving_mid_body_is_counted_and_nothing_is_sent(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        async with running_proxy(rules({"g1": g["g1"].url}, regions={"g1": "eu"}), tmp_path) as p:
            host, port = p.url.removeprefix("http://").split(":")
            _, writer = await asyncio.open_connection(host, int(port))
            writer.write(b"POST /v1/deposits HTTP/1.1\r\nHost: x\r\nContent-Length: 50\r\n\r\n{")
            await writer.drain()
            await asyncio.sleep(0.05)
            writer.close()
            labels = {"route": "-", "gateway": "-", "outcome": "client-closed"}
            await eventually(
                lambda: p.rt.registry.get_sample_value("payswitch_requests_total", labels) == 1
            )
            assert not g["g1"].requests()


async def test_error_statuses_have_problem_bodies(tmp_path: Path) -> None:
    async with gateways("g1", "g2") as g:
        text = rules({n: gw.url for n, gw in g.items()}, regions=dict.fromkeys(g, "eu"))
        async with running_proxy(text, tmp_path) as p:
            # 404: no route
            status, headers, body = await p.post("/v2/unknown")
            assert status == 404
            assert headers["Content-Type"].startswith("application/problem+json")
            assert orjson.loads(body)["status"] == 404
            # 502: every gateway refuses
            await g["g1"].down()
            await g["g2"].down()
            status, _, body = await p.post()
            problem = orjson.loads(body)
            assert status == 502
            assert problem["route"] == "deposits"
            assert problem["region"] == "eu"
            assert {t["gateway"] for t in problem["tried"]} == {"g1", "g2"}
            assert {t["outcome"] for t in problem["tried"]} == {"connect_failure"}
            # 503: no gateway eligible
            for st in p.rt.states.values():
                st.set_flag(Flag.DRAINING, "test")
            status, _, body = await p.post()
            problem = orjson.loads(body)
            assert status == 503
            assert {t["gateway"] for t in problem["tried"]} == {"g1", "g2"}
            for st in p.rt.states.values():
                st.clear_flag(Flag.DRAINING, "test")
            # 504: reads hang everywhere until the total deadline
            await g["g1"].up(Behaviour(mode="hang"))
            await g["g2"].up(Behaviour(mode="hang"))
            status, _, body = await p.request("GET", "/v1/payments/p1", data=None)
            assert status == 504
            assert orjson.loads(body)["title"] == "Gateway timeout"


async def test_gateway_error_status_is_passed_through_when_not_retryable(tmp_path: Path) -> None:
    async with gateways("g1") as g:
        g["g1"].set(mode="status", status=402)
        text = rules({"g1": g["g1"].url}, regions={"g1": "eu"})
        async with running_proxy(text, tmp_path) as p:
            status, headers, body = await p.post()
            assert status == 402
            assert headers["X-Payswitch-Gateway"] == "g1"
            assert orjson.loads(body)["gateway"] == "g1"
            assert p.events.kinds("transaction.") == ["transaction.pending", "transaction.failed"]


async def test_gateway_dying_mid_body_is_a_failed_attempt_not_a_truncated_answer(
    tmp_path: Path,
) -> None:
    async with gateways("g1", "g2") as g:
        g["g1"].set(mode="midbody")
        text = rules({n: gw.url for n, gw in g.items()}, regions=dict.fromkeys(g, "eu"))
        async with running_proxy(text, tmp_path) as p:
            status, headers, body = await p.request("GET", "/v1/payments/p1", data=None)
            assert status == 200
            assert headers["X-Payswitch-Gateway"] == "g2"
            assert orjson.loads(body)["gateway"] == "g2"
