"""forward: header rewriting both ways, and how one attempt turns the client's failures into
outcomes that say whether the gateway may have received the request (a recording client
here; real sockets in tests/integration/test_upstream_*.py)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.model import Limits
from proxy.forward import (
    BUFFER_LIMIT,
    AttemptFailed,
    Forwarder,
    outcome_of,
)
from proxy.upstream.client import (
    DEFAULT_MAX_CONNECTIONS,
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    Expired,
    LocalFailure,
    Pool,
    UpstreamClient,
    UpstreamError,
)
from proxy.upstream.phase import Phase, Progress
from proxy.upstream.state import Outcome
from tests.support import black_hole
from tests.unit.upstream.health_support import gateway


def proxy_of(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


class StubClient(UpstreamClient):
    """Records what the forwarder hands the client's one entry point."""

    def __init__(self, result: UpstreamError) -> None:
        super().__init__()
        self.result = result
        self.calls: list[tuple[Any, ...]] = []

    def send(self, pool: Pool, data: bytes, **kw: Any) -> asyncio.Future[Any]:
        self.calls.append((pool.key[:3], data, kw))
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        fut.set_result(kw["convert"](self.result))
        return fut


def start(client: UpstreamClient, method: str = "POST", **gw: Any) -> asyncio.Future[Any]:
    return Forwarder(client).start(
        gateway(port=9000, base_path="/api", **gw),
        method,
        "/v1/pay?x=1",
        CIMultiDict({"X-A": "1"}),
        b"{}" if method == "POST" else b"",
        connect_timeout=0.5,
        within=2.0,
    )


@pytest.mark.parametrize(
    ("method", "idempotent", "head_only", "max_connections", "cap"),
    [
        ("POST", False, False, None, DEFAULT_MAX_CONNECTIONS),
        ("GET", True, False, 8, 8),
        ("HEAD", True, True, None, DEFAULT_MAX_CONNECTIONS),
    ],
    ids=["post", "get-capped", "head"],
)
async def test_the_request_goes_once_to_the_gateways_origin_and_base_path(
    method: str, idempotent: bool, head_only: bool, max_connections: int | None, cap: int
) -> None:
    stub = StubClient(ConnectFailed("refused"))
    await start(stub, method, limits=Limits(max_connections=max_connections))
    ((origin, data, kw),) = stub.calls
    assert origin == ("http", "127.0.0.1", 9000)
    assert data.startswith(f"{method} /api/v1/pay?x=1 HTTP/1.1\r\n".encode())
    assert (kw["idempotent"], kw["head_only"], kw["max_connections"]) == (
        idempotent,
        head_only,
        cap,
    )
    assert (kw["within"], kw["connect_timeout"], kw["limit"]) == (2.0, 0.5, BUFFER_LIMIT)


@pytest.mark.parametrize(
    ("error", "outcome", "sent"),
    [
        (
            ConnectFailed("connect to 127.0.0.1:9000 failed: refused"),
            Outcome.CONNECT_FAILURE,
            False,
        ),
        (LocalFailure("payswitch cannot open a connection: EMFILE"), Outcome.LOCAL, False),
        (ConnectionLost("connection lost: closed by the gateway"), Outcome.RESET, True),
        (BadResponse("invalid response: bad status"), Outcome.BAD_RESPONSE, True),
        (Expired("no complete answer within the time given"), Outcome.TIMEOUT, True),
    ],
    ids=["connect-failed", "local", "connection-lost", "bad-response", "expired"],
)
def test_client_failures_become_outcomes(
    error: UpstreamError, outcome: Outcome, sent: bool
) -> None:
    failed = outcome_of(error)
    assert isinstance(failed, AttemptFailed)
    assert (failed.outcome, failed.sent, failed.detail) == (outcome, sent, str(error))


async def test_a_head_that_would_split_is_refused_unsent() -> None:
    stub = StubClient(ConnectFailed("unused"))
    failed = await Forwarder(stub).start(
        gateway(port=9000),
        "GET",
        "/",
        CIMultiDict({"X-Id": "7\r\nX-Evil: 1"}),
        b"",
        connect_timeout=0.5,
        within=1,
    )
    assert isinstance(failed, AttemptFailed)
    assert (failed.outcome, failed.sent, stub.calls) == (Outcome.BAD_RESPONSE, False, [])


async def test_connect_timeout_is_a_connect_failure() -> None:
    client = UpstreamClient()
    progress = Progress()
    with black_hole() as port:
        failed = await Forwarder(client).start(
            gateway(port=port),
            "POST",
            "/",
            CIMultiDict(),
            b"{}",
            connect_timeout=0.05,
            within=1,
            progress=progress,
        )
        assert isinstance(failed, AttemptFailed)
        assert (failed.outcome, failed.sent, progress.phase) == (
            Outcome.CONNECT_FAILURE,
            False,
            Phase.CONNECTING,
        )
        assert "timed out" in failed.detail
        # The caller's own timer firing during connect is the caller's to judge: the future
        # is cancelled, the socket closed, and the slot given back.
        fut = Forwarder(client).start(
            gateway(port=port), "POST", "/", CIMultiDict(), b"{}", connect_timeout=5, within=1
        )
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.05):
                await fut
        assert client.open_count(("http", "127.0.0.1", port)) == 0
    await client.close()
