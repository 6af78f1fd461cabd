"""The floor: the least an aiohttp proxy can do, with no routing, retries or accounting.

payswitch's throughput is judged as a ratio to this process in the same run. It reads the
whole body, forwards method, path and end-to-end headers over one pooled keep-alive session
and returns the upstream's answer. Must not grow features: anything added here raises the
floor payswitch is compared with.
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web
from multidict import CIMultiDict, MultiMapping

# RFC 9110 §7.6.1 hop-by-hop fields, plus the framing fields aiohttp recomputes itself.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
    }
)
UPSTREAM = web.AppKey("upstream", str)
SESSION = web.AppKey("session", aiohttp.ClientSession)


def end_to_end(headers: MultiMapping[str]) -> CIMultiDict[str]:
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in HOP_BY_HOP:
            out.add(name, value)
    return out


async def forward(request: web.Request) -> web.Response:
    body = await request.read()
    url = request.app[UPSTREAM] + request.rel_url.raw_path_qs
    async with request.app[SESSION].request(
        request.method, url, headers=end_to_end(request.headers), data=body, allow_redirects=False
    ) as upstream:
        payload = await upstream.read()
        return web.Response(
            status=upstream.status, headers=end_to_end(upstream.headers), body=payload
        )


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    # auto_decompress off: bytes pass through exactly as the upstream encoded them.
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
        app[SESSION] = session
        yield


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--listen", default="127.0.0.1:8081", help="host:port to serve on")
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8080")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    app = web.Application()
    app[UPSTREAM] = args.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    web.run_app(
        app, host=host, port=int(port), access_log=None, print=None, loop=uvloop.new_event_loop()
    )


if __name__ == "__main__":
    main()
