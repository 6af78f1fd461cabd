"""Request heads, gathered from httptools' callbacks under the listener's limits.

Owns: the parser of one connection, the head being gathered (target, fields, framing,
Host and Expect), the limits checked field by field, and building the `Request` once the
head is whole. Body pieces and message ends are passed straight to the connection.
Must not: queue, serve or answer requests (the connection does); a broken limit raises
`Refusal` out of the parser, and the connection answers it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final

from httptools import HttpRequestParser
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.http import Request
from proxy.server.limits import MAX_FIELD, MAX_HEAD_BYTES, MAX_HEADERS, MAX_TARGET, Refusal

if TYPE_CHECKING:
    from proxy.server.connection import Connection

_OWS: Final = frozenset(b" \t")


class HeadReader:
    """httptools' callback object for one connection."""

    __slots__ = (
        "chunked",
        "conn",
        "expect",
        "field_count",
        "fields",
        "head_bytes",
        "head_since",
        "hosts",
        "in_head",
        "length",
        "parser",
        "target",
        "unparsed",
    )

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.parser = HttpRequestParser(self)
        self.unparsed = 0  # bytes fed since the parser last completed anything
        self.head_since = conn.loop.time()
        self.in_head = False  # a head has begun arriving and is not whole yet
        self._reset()

    def _reset(self) -> None:
        self.target = b""
        self.fields: list[tuple[bytes, bytes]] = []
        self.field_count = 0  # of the head, then (reset) of the trailers
        self.head_bytes = 0
        self.length: int | None = None
        self.chunked = False
        self.expect = False
        self.hosts = 0

    def on_message_begin(self) -> None:
        self._reset()
        self.in_head = True
        self.head_since = self.conn.loop.time()

    def on_url(self, url: bytes) -> None:
        self.target += url
        if len(self.target) > MAX_TARGET:
            raise Refusal(414, f"request target exceeds {MAX_TARGET} bytes")

    def on_header(self, name: bytes, value: bytes) -> None:
        size = len(name) + len(value)
        if size > MAX_FIELD:
            raise Refusal(431, f"a header field exceeds {MAX_FIELD} bytes")
        self.unparsed = 0
        self.head_bytes += size
        self.field_count += 1
        if self.field_count > MAX_HEADERS or self.head_bytes > MAX_HEAD_BYTES:
            what = "header" if self.in_head else "trailer"
            raise Refusal(
                431, f"more than {MAX_HEADERS} {what} fields or {MAX_HEAD_BYTES} bytes of them"
            )
        if not self.in_head:
            return  # a trailer of a chunked body: counted like the head, otherwise ignored
        if value and value[-1] in _OWS:
            # llhttp strips the whitespace before a value, not after it (RFC 9110 §5.5
            # excludes both): "key " and "key" must be one idempotency key.
            value = value.rstrip(b" \t")
        self.fields.append((name, value))
        n = len(name)
        if n == 14 and name.lower() == b"content-length":
            self.length = int(value)  # httptools has checked it is a number
        elif n == 17 and name.lower() == b"transfer-encoding":
            if value.strip().lower() != b"chunked":
                raise Refusal(501, "only the chunked transfer coding is supported")
            self.chunked = True
        elif n == 4 and name.lower() == b"host":
            self.hosts += 1
        elif n == 6 and name.lower() == b"expect":
            if value.strip().lower() != b"100-continue":
                raise Refusal(417, "only Expect: 100-continue is supported")
            self.expect = True

    def on_headers_complete(self) -> None:
        parser = self.parser
        version = parser.get_http_version()
        if version not in ("1.1", "1.0"):
            raise Refusal(505, f"HTTP/{version} is not supported; use HTTP/1.1")
        http11 = version == "1.1"
        if self.hosts > 1 or (http11 and self.hosts == 0):
            raise Refusal(400, "an HTTP/1.1 request needs exactly one Host header")
        if parser.should_upgrade() and (self.length or self.chunked):
            # llhttp would hand the body over as the new protocol's bytes: refuse rather
            # than forward a payment without its body.
            raise Refusal(400, "a protocol upgrade with a request body is not supported")
        headers = CIMultiDict(
            [(n.decode("latin-1"), v.decode("utf-8", "surrogateescape")) for n, v in self.fields]
        )
        req = Request(
            self.conn,
            parser.get_method().decode("ascii"),
            self.target.decode("utf-8", "surrogateescape"),
            CIMultiDictProxy(headers),
            self.length,
            parser.should_keep_alive(),
            http11,
        )
        req.expect_continue = self.expect and http11
        self.in_head = False
        self.unparsed = 0
        self.head_bytes = self.field_count = 0
        self.conn.head_arrived(req)

    def on_body(self, body: bytes) -> None:
        self.unparsed = 0
        self.conn.body_arrived(body)

    def on_message_complete(self) -> None:
        self.unparsed = 0
        self.conn.request_complete()
