"""The traffic listener: a lean HTTP/1.1 server in front of the proxy handler.

Owns: accepting client connections (up to a cap), parsing requests with httptools under
limits (request target, header fields, head size, pipelined requests queued), buffering
each request body for the handler up to the largest any route accepts, writing each answer
(whole, or streamed with Content-Length, chunked or close-delimited framing), keep-alive
with an idle timeout, a read timeout against clients that stall mid-request,
`Expect: 100-continue`, clear problem+json refusals of malformed HTTP, and a graceful
drain and close that let requests which have begun finish.
Must not: route, retry or account requests (the handler does), or cancel a handler whose
client went away: a payment already sent must run to its end and be recorded.

The parts, as in uvicorn: `listener` (accepting, the sweep, shutdown), `connection` (one
connection's phase, intake and order), `head` (request heads from httptools), `cycle`
(one request's answer), `deadlines`, `admission` (the connection cap), `sockets`, `wire`
(answer heads as bytes) and `limits`. The request and answer types live in `proxy.http`,
which the proxy imports instead of this package.

aiohttp's web server is not used here for the same reason the upstream client is lean:
its generic request/response machinery cost more CPU per proxied request than routing,
retries and accounting together. The admin and probes ports are served by this listener
too, with the small router of proxy.adminhttp.
"""

from proxy.http import (
    Answer,
    BodyError,
    BodyOverCap,
    BodyTimeout,
    ClientClosed,
    Handler,
    MalformedBody,
    Request,
    problem,
)
from proxy.server.admission import ConnectionCap, raise_open_files_limit
from proxy.server.limits import (
    KEEPALIVE_TIMEOUT,
    MAX_FIELD,
    MAX_HEAD_BYTES,
    MAX_HEADERS,
    MAX_PIPELINED,
    MAX_QUEUED_BODY,
    MAX_TARGET,
    MAX_WAITING,
    READ_TIMEOUT,
    WRITE_TIMEOUT,
)
from proxy.server.listener import ProxyServer

__all__ = [
    "KEEPALIVE_TIMEOUT",
    "MAX_FIELD",
    "MAX_HEADERS",
    "MAX_HEAD_BYTES",
    "MAX_PIPELINED",
    "MAX_QUEUED_BODY",
    "MAX_TARGET",
    "MAX_WAITING",
    "READ_TIMEOUT",
    "WRITE_TIMEOUT",
    "Answer",
    "BodyError",
    "BodyOverCap",
    "BodyTimeout",
    "ClientClosed",
    "ConnectionCap",
    "Handler",
    "MalformedBody",
    "ProxyServer",
    "Request",
    "problem",
    "raise_open_files_limit",
]
