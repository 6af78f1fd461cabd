"""forward: header rewriting both ways, and how one attempt turns the client's failures into
outcomes that say whether the gateway may have received the request (stub clients here; real
sockets in tests/integration/test_upstream_client.py)."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.forward import (
    BUFFER_LIMIT,
    AttemptFailed,
    Forwarder,
)
from proxy.upstream.client import (
    BadResponse,
    ConnectFailed,
    ConnectionLost,
    Origin,
    Response,
    UpstreamClient,
)
from proxy.upstream.state import Outcome
from tests.unit.upstream.health_support import gateway


def proxy_of(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


class FakeResponse:
    """What Forwarder reads of a client response, scripted."""

    def __init__(self, body: bytes, *, length: int | None, fail: BaseException | None = None):
        self.status = 200
        self.headers = proxy_of(("X-A", "1"))
        self.content_length = length
        self.body, self.fail = body, fail
        self.released = 0

    async def read_up_to(self, limit: int) -> bytes:
        if self.fail is not None:
            raise self.fail
        return self.body[: limit + 1]

    def release(self) -> None:
        self.released += 1


class StubClient(UpstreamClient):
    def __init__(self, result: FakeResponse | BaseException) -> None:
        super().__init__()
        self.result = result
        self.calls: list[tuple[Any, ...]] = []

    async def request(
        self,
        origin: Origin,
        method: str,
        target: str,
        headers: CIMultiDict[str],
        body: bytes,
        *,
        connect_timeout: float,
    ) -> Response:
        self.calls.append((origin, method, target, body, connect_timeout))
        if isinstance(self.result, BaseException):
            raise self.result
        return cast(Response, self.result)


async def attempt(client: UpstreamClient) -> Any:
    return await Forwarder(client).attempt(
        gateway(port=9000, base_path="/api"),
        "POST",
        "/v1/pay?x=1",
        CIMultiDict(),
        b"{}",
        connect_timeout=0.5,
    )


async def test_the_request_goes_to_the_gateways_origin_and_base_path() -> None:
    stub = StubClient(FakeResponse(b"ok", length=2))
    await attempt(stub)
    assert stub.calls == [(("http", "127.0.0.1", 9000), "POST", "/api/v1/pay?x=1", b"{}", 0.5)]


@pytest.mark.parametrize(
    ("error", "outcome", "sent"),
    [
        (
            ConnectFailed("connect to 127.0.0.1:9000 failed: refused"),
            Outcome.CONNECT_FAILURE,
            False,
        ),
        (ConnectionLost("connection lost: closed by the gateway"), Outcome.RESET, True),
        (BadResponse("invalid response: bad status"), Outcome.BAD_RESPONSE, True),
        (ValueError("CR or LF inside a header"), Outcome.BAD_RESPONSE, False),
    ],
    ids=["connect-failed", "connection-lost", "bad-response", "unsendable-head"],
)
async def test_client_failures_become_outcomes(
    error: Exception, outcome: Outcome, sent: bool
) -> None:
    with pytest.raises(AttemptFailed) as caught:
        await attempt(StubClient(error))
    assert (caught.value.outcome, caught.value.sent) == (outcome, sent)


@pytest.mark.parametrize(
    ("body", "length", "streamed", "released"),
    [
        (b"ok", 2, False, 1),
        (b"ok", None, False, 1),
        (b"x" * (BUFFER_LIMIT + 10), None, True, 0),
        (b"", BUFFER_LIMIT + 1, True, 0),
    ],
    ids=["sized-small", "unsized-small", "unsized-large", "sized-large"],
)
async def test_small_answers_are_read_whole_large_ones_streamed(
    body: bytes, length: int | None, streamed: bool, released: int
) -> None:
    resp = FakeResponse(body, length=length)
    reply = await attempt(StubClient(resp))
    assert (reply.stream is not None, resp.released) == (streamed, released)
    if not streamed:
        assert reply.body == body


@pytest.mark.parametrize(
    ("error", "outcome"),
    [(ConnectionLost("closed"), Outcome.RESET), (BadResponse("bad chunk"), Outcome.BAD_RESPONSE)],
    ids=["cut-off", "bad-body"],
)
async def test_a_body_that_fails_is_a_failed_attempt(error: Exception, outcome: Outcome) -> None:
    resp = FakeResponse(b"", length=100, fail=error)
    with pytest.raises(AttemptFailed) as caught:
        await attempt(StubClient(resp))
    assert (caught.value.outcome, caught.value.sent, resp.released) == (outcome, True, 1)


async def test_cancelled_while_reading_the_body_releases_and_propagates() -> None:
    resp = FakeResponse(b"", length=100, fail=asyncio.CancelledError())
    with pytest.raises(asyncio.CancelledError):
        await attempt(StubClient(resp))
    assert resp.released == 1


async def test_connect_timeout_is_a_connect_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    async def never_connects(*args: Any, **kwargs: Any) -> Any:
        await asyncio.Event().wait()

    monkeypatch.setattr(asyncio.get_running_loop(), "create_connection", never_connects)
    client = UpstreamClient()
    with pytest.raises(AttemptFailed) as caught:
        await Forwarder(client).attempt(
            gateway(port=9000), "POST", "/", CIMultiDict(), b"{}", connect_timeout=0.01
        )
    assert (caught.value.outcome, caught.value.sent) == (Outcome.CONNECT_FAILURE, False)
    assert "timed out" in caught.value.detail
    # The caller's own deadline firing during connect is the caller's to judge: not ours.
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.01):
            await Forwarder(client).attempt(
                gateway(port=9000), "POST", "/", CIMultiDict(), b"{}", connect_timeout=5
            )
    await client.close()
