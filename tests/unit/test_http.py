"""Request bodies as the handler reads them, and the problem+json shape."""

from __future__ import annotations

import asyncio

import orjson
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http import (
    BodyOverCap,
    BodyTimeout,
    ClientClosed,
    MalformedBody,
    Request,
    problem,
    problem_fields,
)


class Channel:
    """What a request needs of its connection."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.remote: str | None = "10.0.0.1"
        self.open = True
        self.eof = False
        self.continues = 0

    def send_continue(self) -> None:
        self.continues += 1


def request(channel: Channel, target: str = "/v1/pay", length: int | None = 6) -> Request:
    headers = CIMultiDictProxy(CIMultiDict([("Host", "h")]))
    return Request(channel, "POST", target, headers, length, True, True)


@pytest.mark.parametrize(
    ("target", "path"),
    [("/v1/pay?x=1", "/v1/pay"), ("/v1/a%20b", "/v1/a b"), ("/", "/")],
    ids=["query", "escaped", "root"],
)
async def test_the_path_is_the_unescaped_target_without_query(target: str, path: str) -> None:
    req = request(Channel(), target)
    assert (req.path, req.raw_path, req.host, req.remote) == (path, target, "h", "10.0.0.1")


async def test_a_body_in_pieces_is_read_whole_after_a_continue() -> None:
    channel = Channel()
    req = request(channel)
    req.expect_continue = True
    reading = asyncio.get_running_loop().create_task(req.read(10))
    for piece in (b"ab", b"cd", b"ef"):
        await asyncio.sleep(0)
        req.size += len(piece)
        req.add(piece)
        req.wake()
    req.complete = True
    req.wake()
    assert await reading == b"abcdef"
    assert channel.continues == 1 and isinstance(req.body, bytes)


@pytest.mark.parametrize(
    ("fail", "error"),
    [
        ("over", BodyOverCap),
        ("malformed", MalformedBody),
        ("timeout", BodyTimeout),
        ("gone", ClientClosed),
    ],
    ids=["over-cap", "malformed", "timeout", "client-gone"],
)
async def test_a_body_that_cannot_be_read_whole_raises_why(
    fail: str, error: type[Exception]
) -> None:
    channel = Channel()
    req = request(channel)
    if fail == "over":
        req.size = 11
    elif fail == "malformed":
        req.error = MalformedBody("bad chunk")
    elif fail == "timeout":
        req.error = BodyTimeout("slow")
    else:
        channel.open = False
    with pytest.raises(error):
        await req.read(10)


async def test_a_detached_request_reads_as_the_client_gone() -> None:
    req = request(Channel())
    req.detach()
    with pytest.raises(ClientClosed):
        await req.read(10)


def test_problems_follow_rfc_9457() -> None:
    answer = problem(400, "Bad Request", "why", "bad-request")
    assert answer.status == 400
    assert answer.headers == {"Content-Type": "application/problem+json"}
    assert orjson.loads(answer.body) == problem_fields(400, "Bad Request", "why", "bad-request")
    assert orjson.loads(answer.body)["type"] == "https://payswitch.dev/problems/bad-request"


LEAVING = {
    # how the connection stands, whether the client has left
    "open": ({}, False),
    "half-closed by the client": ({"eof": True}, True),
    "closed": ({"open": False}, True),
}


@pytest.mark.parametrize(("state", "left"), LEAVING.values(), ids=LEAVING)
async def test_client_left(state: dict[str, bool], left: bool) -> None:
    channel = Channel()
    req = request(channel)
    for name, value in state.items():
        setattr(channel, name, value)
    assert req.client_left is left
    req.detach()
    assert req.client_left  # answered: nothing more goes to that client
