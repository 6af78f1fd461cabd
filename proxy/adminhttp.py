"""The small HTTP router of the admin and probes listeners, on payswitch's own listener.

Owns: `Route` (a method, a path pattern whose `{name}` segments are parameters, and a
handler), `Router` (matching a request to its route; HEAD served by the GET handler without
its body; 405 with `Allow` for a known path asked with another method; 404 otherwise), what
a handler sees (`AdminRequest`: method, path, parameters, query, headers and the body, read
whole under `MAX_BODY`), JSON and text answers, the refusal of a body over the cap (413),
malformed (400) or stalled (408), and `serve`, which starts a listener for a router.
Must not: know any endpoint or check tokens itself (the admin module gives a `guard`, asked
before any route is matched), or share the traffic listener's connection cap.

aiohttp's web server is not used for the admin port: it and its dependencies are about a
fifth of a sidecar's idle memory, for a port that answers a few requests a minute.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import parse_qsl, unquote

from multidict import CIMultiDictProxy

from proxy.http import (
    Answer,
    BodyOverCap,
    BodyTimeout,
    ClientClosed,
    MalformedBody,
    Request,
    problem,
)
from proxy.server import ConnectionCap, ProxyServer

logger = logging.getLogger(__name__)

#: The largest request body an admin endpoint reads; none needs more than a few bytes.
MAX_BODY: Final = 64 * 1024
#: Connections the admin listener keeps open at once: scripts, a dashboard or two, probes.
MAX_CONNECTIONS: Final = 64


class AdminRequest:
    """What an admin handler sees of its request."""

    __slots__ = ("_query", "body", "params", "request")

    def __init__(self, request: Request, body: bytes) -> None:
        self.request = request
        self.body = body
        self.params: dict[str, str] = {}
        self._query: dict[str, str] | None = None

    @property
    def method(self) -> str:
        return self.request.method

    @property
    def path(self) -> str:
        return self.request.path

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        return self.request.headers

    @property
    def query(self) -> Mapping[str, str]:
        """The query string's fields, the first of each name."""
        if self._query is None:
            _, _, qs = self.request.raw_path.partition("?")
            found: dict[str, str] = {}
            for name, value in parse_qsl(qs, keep_blank_values=True):
                found.setdefault(name, value)
            self._query = found
        return self._query

    @property
    def client_left(self) -> bool:
        """True once the client has gone; a streamed answer ends then."""
        return self.request.client_left


AdminHandler = Callable[[AdminRequest], Awaitable[Answer]]
Guard = Callable[[AdminRequest], Answer | None]


def json_response(
    data: Any,
    *,
    status: int = 200,
    content_type: str = "application/json",
    headers: Mapping[str, str] | None = None,
    dumps: Callable[[Any], str] = json.dumps,
) -> Answer:
    """`data` as JSON (UTF-8), with any extra `headers`."""
    fields = {"Content-Type": f"{content_type}; charset=utf-8", **(headers or {})}
    return Answer(status, fields, dumps(data).encode())


def text_response(
    text: str,
    *,
    status: int = 200,
    content_type: str = "text/plain",
    headers: Mapping[str, str] | None = None,
) -> Answer:
    fields = {"Content-Type": f"{content_type}; charset=utf-8", **(headers or {})}
    return Answer(status, fields, text.encode())


@dataclass(frozen=True, slots=True)
class Route:
    """One endpoint: `pattern` segments in braces match any one non-empty segment."""

    method: str
    pattern: str
    handler: AdminHandler
    segments: tuple[tuple[bool, str], ...]  # (is a parameter, name or literal text)

    def match(self, parts: list[str]) -> dict[str, str] | None:
        """The parameters when the path's decoded segments `parts` fit the pattern."""
        if len(parts) != len(self.segments):
            return None
        params: dict[str, str] = {}
        for (is_param, text), part in zip(self.segments, parts, strict=True):
            if is_param:
                if not part:
                    return None
                params[text] = part
            elif part != text:
                return None
        return params


def route(method: str, pattern: str, handler: AdminHandler) -> Route:
    if not pattern.startswith("/"):
        raise ValueError(f"a route pattern starts with '/': {pattern!r}")
    segments = tuple(
        (True, s[1:-1]) if s.startswith("{") and s.endswith("}") else (False, s)
        for s in pattern.split("/")[1:]
    )
    return Route(method.upper(), pattern, handler, segments)


def get(pattern: str, handler: AdminHandler) -> Route:
    return route("GET", pattern, handler)


def post(pattern: str, handler: AdminHandler) -> Route:
    return route("POST", pattern, handler)


def _path_segments(raw_path: str) -> list[str] | None:
    """The path's segments, each percent-decoded on its own (so an encoded slash stays
    inside its segment); None for a target that is not an origin-form path."""
    path = raw_path.partition("?")[0].partition("#")[0]
    if not path.startswith("/"):
        return None
    return [unquote(s) for s in path.split("/")[1:]]


class Router:
    """Requests to handlers; a `guard` sees every request before any route is matched."""

    def __init__(self, routes: Iterable[Route] = (), *, guard: Guard | None = None) -> None:
        self.guard = guard
        self._routes: list[Route] = []
        for r in routes:
            self.add(r)

    def add(self, r: Route) -> None:
        shape = [None if is_param else text for is_param, text in r.segments]
        for known in self._routes:
            same = [None if is_param else text for is_param, text in known.segments] == shape
            if same and known.method == r.method:
                raise ValueError(f"{r.method} {r.pattern} is routed twice")
        self._routes.append(r)

    def routes(self) -> list[tuple[str, str]]:
        """(method, pattern) of every route, in the order they were added."""
        return [(r.method, r.pattern) for r in self._routes]

    async def handle(self, request: Request) -> Answer:
        """The listener's handler: the body read under the cap, the guard, the route."""
        try:
            body = await request.read(MAX_BODY)
        except BodyOverCap:
            return problem(
                413,
                "Content Too Large",
                f"admin request bodies are at most {MAX_BODY} bytes",
                "body-too-large",
            )
        except BodyTimeout:
            return problem(408, "Request Timeout", "the request body stalled", "body-timeout")
        except (MalformedBody, ClientClosed) as exc:
            return problem(400, "Bad Request", str(exc), "malformed-body")
        req = AdminRequest(request, body)
        if self.guard is not None:
            refused = self.guard(req)
            if refused is not None:
                return refused
        answer = await self._dispatch(req)
        if request.method == "HEAD":
            return _headless(answer)
        return answer

    async def _dispatch(self, req: AdminRequest) -> Answer:
        parts = _path_segments(req.request.raw_path)
        if parts is None:
            return problem(400, "Bad Request", "the request target is not a path", "bad-target")
        allowed: set[str] = set()
        method = "GET" if req.method == "HEAD" else req.method
        for r in self._routes:
            params = r.match(parts)
            if params is None:
                continue
            if r.method == method:
                req.params = params
                return await r.handler(req)
            allowed.add(r.method)
        if allowed:
            if "GET" in allowed:
                allowed.add("HEAD")
            answer = problem(
                405,
                "Method Not Allowed",
                f"{req.method} is not served on {req.path}",
                "method-not-allowed",
            )
            return Answer(405, {**answer.headers, "Allow": ", ".join(sorted(allowed))}, answer.body)
        return problem(404, "Not Found", f"nothing is served on {req.path}", "not-found")


def _headless(answer: Answer) -> Answer:
    """The GET answer's head for HEAD: its length announced, no body sent."""
    headers = dict(answer.headers)
    if answer.stream is not None:
        answer.stream.release()
    else:
        headers["Content-Length"] = str(len(answer.body))
    return Answer(answer.status, headers)


async def serve(router: Router, host: str, port: int) -> ProxyServer:
    """A started listener for `router`, with a connection cap of its own."""
    server = ProxyServer(router.handle, lambda: MAX_BODY, ConnectionCap(MAX_CONNECTIONS))
    await server.start(host, port, backlog=128)
    return server
