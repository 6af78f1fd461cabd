"""The admin router over a real listener on loopback: matching, HEAD, 404/405, bodies."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from proxy.adminhttp import (
    MAX_BODY,
    AdminRequest,
    Route,
    Router,
    get,
    json_response,
    post,
    route,
    text_response,
)
from proxy.http import Answer
from tests.support import Client, serving, serving_client


async def _things(_: AdminRequest) -> Answer:
    return json_response(["a", "b"])


async def _thing(req: AdminRequest) -> Answer:
    return json_response({"name": req.params["name"], "query": dict(req.query)})


async def _poke(req: AdminRequest) -> Answer:
    return json_response({"poked": req.params["name"], "body": len(req.body)}, status=202)


async def _teapot(_: AdminRequest) -> Answer:
    return text_response("short and stout", status=418, headers={"Retry-After": "5"})


ROUTES: list[Route] = [
    get("/things", _things),
    get("/things/{name}", _thing),
    post("/things/{name}/poke", _poke),
    route("put", "/teapot", _teapot),
]


@pytest.fixture
async def client() -> AsyncIterator[Client]:
    async with serving_client(Router(ROUTES)) as c:
        yield c


# method, path, status, JSON body (None: not checked), Allow
CASES: dict[str, tuple[str, str, int, object, str | None]] = {
    "list": ("GET", "/things", 200, ["a", "b"], None),
    "parameter": ("GET", "/things/x1", 200, {"name": "x1", "query": {}}, None),
    "encoded slash stays in its segment": (
        "GET",
        "/things/a%2Fb",
        200,
        {"name": "a/b", "query": {}},
        None,
    ),
    "query, first of each name": (
        "GET",
        "/things/x?severity=warning&severity=info&flag",
        200,
        {"name": "x", "query": {"severity": "warning", "flag": ""}},
        None,
    ),
    "post with a parameter": ("POST", "/things/x/poke", 202, {"poked": "x", "body": 0}, None),
    "GET-only path posted": ("POST", "/things", 405, None, "GET, HEAD"),
    "POST-only path read": ("GET", "/things/x/poke", 405, None, "POST"),
    "unknown": ("GET", "/nothing", 404, None, None),
    "trailing slash": ("GET", "/things/", 404, None, None),
    "double slash": ("GET", "//things", 404, None, None),
    "dot-dot is not resolved": ("GET", "/things/x/../../things", 404, None, None),
    "empty parameter": ("POST", "/things//poke", 404, None, None),
    "lower-case method routed": ("PUT", "/teapot", 418, None, None),
}


@pytest.mark.parametrize(("method", "path", "status", "body", "allow"), CASES.values(), ids=CASES)
async def test_routing(
    client: Client, method: str, path: str, status: int, body: object, allow: str | None
) -> None:
    resp = await client.request(method, path)
    assert resp.status == status
    if body is not None:
        assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
        assert await resp.json() == body
    if status in (404, 405):
        assert resp.content_type == "application/problem+json"
        assert (await resp.json())["status"] == status
    assert resp.headers.get("Allow") == allow


async def _exchange(base: str, raw: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(raw)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), 5)
    finally:
        writer.close()


async def test_head_is_the_get_answer_without_its_body() -> None:
    async with serving(Router(ROUTES)) as base:
        target = b" /things/x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
        full = await _exchange(base, b"GET" + target)
        head = await _exchange(base, b"HEAD" + target)
    _, body = full.split(b"\r\n\r\n", 1)
    head_head, nothing = head.split(b"\r\n\r\n", 1)
    assert head_head.startswith(b"HTTP/1.1 200 OK")
    assert nothing == b""
    assert f"Content-Length: {len(body)}".encode() in head_head
    assert b"Content-Type: application/json; charset=utf-8" in head_head


async def test_extra_headers_and_text_answers(client: Client) -> None:
    resp = await client.request("PUT", "/teapot")
    assert resp.headers["Retry-After"] == "5"
    assert resp.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert await resp.text() == "short and stout"


@pytest.mark.parametrize(
    ("size", "status"),
    [(10, 202), (MAX_BODY, 202), (MAX_BODY + 1, 413)],
    ids=["small", "at the cap", "over the cap"],
)
async def test_bodies_are_read_whole_up_to_the_cap(client: Client, size: int, status: int) -> None:
    resp = await client.post("/things/x/poke", data=b"x" * size)
    assert resp.status == status
    if status == 202:
        assert (await resp.json())["body"] == size
    else:
        assert resp.content_type == "application/problem+json"
        assert str(MAX_BODY) in (await resp.json())["detail"]


MALFORMED = {
    "broken chunk size": (
        b"POST /things/x/poke HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 400 ",
    ),
    "no Host": (b"GET /things HTTP/1.1\r\n\r\n", b"HTTP/1.1 400 "),
    "not HTTP": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03\r\n\r\n", b"HTTP/1.1 400 "),
    "absolute target": (
        b"GET http://elsewhere/things HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
        b"HTTP/1.1 400 ",
    ),
}


@pytest.mark.parametrize(("raw", "start"), MALFORMED.values(), ids=MALFORMED)
async def test_a_malformed_request_gets_a_clear_4xx(raw: bytes, start: bytes) -> None:
    async with serving(Router(ROUTES)) as base:
        answer = await _exchange(base, raw)
    assert answer.startswith(start), answer
    assert b"application/problem+json" in answer


async def test_the_guard_sees_every_request_before_routing() -> None:
    seen: list[str] = []

    def guard(req: AdminRequest) -> Answer | None:
        seen.append(req.path)
        if req.headers.get("X-Let-In") == "yes":
            return None
        return json_response({"no": True}, status=401)

    async with serving_client(Router(ROUTES, guard=guard)) as c:
        assert (await c.get("/things")).status == 401
        assert (await c.get("/nothing")).status == 401  # not even whether it exists
        assert (await c.get("/things", headers={"X-Let-In": "yes"})).status == 200
        assert (await c.get("/nothing", headers={"X-Let-In": "yes"})).status == 404
    assert seen == ["/things", "/nothing", "/things", "/nothing"]


def test_router_lists_its_routes_and_refuses_a_duplicate() -> None:
    router = Router(ROUTES)
    assert router.routes() == [
        ("GET", "/things"),
        ("GET", "/things/{name}"),
        ("POST", "/things/{name}/poke"),
        ("PUT", "/teapot"),
    ]
    with pytest.raises(ValueError, match="routed twice"):
        router.add(get("/things/{other}", _things))
    with pytest.raises(ValueError, match="starts with"):
        get("things", _things)
