"""The listener against h11 on one corpus of raw requests: valid, malformed and smuggling
attempts. Both must agree on accept or refuse and on the parsed method, target, headers
and body; where payswitch is stricter on purpose, the case and the reason are listed in
STRICTER, and the test checks that the difference is still there."""

from __future__ import annotations

import pytest

from tests.integration.listener.wiretap import Parsed, h11_outcome, payswitch_outcome

H = b"Host: t\r\n"


def post(body: bytes, extra: bytes = b"") -> bytes:
    return (
        b"POST /pay HTTP/1.1\r\n"
        + H
        + b"Content-Length: %d\r\n" % len(body)
        + extra
        + b"\r\n"
        + body
    )


CORPUS: dict[str, bytes] = {
    # -- valid -------------------------------------------------------------------------------
    "get": b"GET / HTTP/1.1\r\n" + H + b"\r\n",
    "get-query": b"GET /v1/a%20b?x=1&y=%2F HTTP/1.1\r\n" + H + b"\r\n",
    "post-length": post(b'{"amount": 10}'),
    "post-empty": post(b""),
    "post-chunked": b"POST /pay HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"4\r\nWiki\r\n5\r\npedia\r\n0\r\n\r\n",
    "chunked-uppercase-hex": b"POST /p HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"A\r\n0123456789\r\n0\r\n\r\n",
    "chunked-trailer": b"POST /p HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1\r\na\r\n0\r\nX-Sum: 1\r\n\r\n",
    "te-chunked-mixed-case": b"POST /p HTTP/1.1\r\n" + H + b"Transfer-Encoding: ChUnKeD\r\n\r\n"
    b"1\r\na\r\n0\r\n\r\n",
    "http-1-0": b"GET /old HTTP/1.0\r\n\r\n",
    "http-1-0-keep-alive-pair": b"GET /a HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
    b"GET /b HTTP/1.0\r\n\r\n",
    "pipelined-pair": post(b"1") + post(b"22"),
    "pipelined-get-post": b"GET /a HTTP/1.1\r\n" + H + b"\r\n" + post(b"x"),
    "connection-close-stops-pipeline": b"GET /a HTTP/1.1\r\n"
    + H
    + b"Connection: close\r\n\r\n"
    + b"GET /b HTTP/1.1\r\n"
    + H
    + b"\r\n",
    "ows-around-value": b"GET / HTTP/1.1\r\nHost:   t  \r\nX-A:\tv\t\r\n\r\n",
    "empty-header-value": b"GET / HTTP/1.1\r\n" + H + b"X-Empty:\r\n\r\n",
    "repeated-header": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\nX-A: 2\r\n\r\n",
    "options-star": b"OPTIONS * HTTP/1.1\r\n" + H + b"\r\n",
    "absolute-form": b"GET http://gw.example/pay?x=1 HTTP/1.1\r\nHost: gw.example\r\n\r\n",
    "connect-authority": b"CONNECT gw.example:443 HTTP/1.1\r\nHost: gw.example:443\r\n\r\n",
    "utf8-in-value": b"GET / HTTP/1.1\r\n" + H + "X-Name: Zoë\r\n\r\n".encode(),
    "leading-crlf": b"\r\nGET / HTTP/1.1\r\n" + H + b"\r\n",
    "head": b"HEAD / HTTP/1.1\r\n" + H + b"\r\n",
    # -- malformed ---------------------------------------------------------------------------
    "garbage": b"GARBAGE\r\n\r\n",
    "http-0-9": b"GET /\r\n\r\n",
    "huge-version": b"GET / HTTP/11.1\r\n" + H + b"\r\n",
    "version-2": b"GET / HTTP/2.0\r\n" + H + b"\r\n",
    "version-1-2": b"GET / HTTP/1.2\r\n" + H + b"\r\n",
    "lowercase-version": b"GET / http/1.1\r\n" + H + b"\r\n",
    "no-host": b"GET / HTTP/1.1\r\n\r\n",
    "two-hosts": b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
    "header-without-colon": b"GET / HTTP/1.1\r\n" + H + b"NoColon\r\n\r\n",
    "space-before-colon": b"GET / HTTP/1.1\r\n" + H + b"X-A : 1\r\n\r\n",
    "space-in-name": b"GET / HTTP/1.1\r\n" + H + b"X A: 1\r\n\r\n",
    "nul-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x00b\r\n\r\n",
    "ctl-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x01b\r\n\r\n",
    "del-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\x7fb\r\n\r\n",
    "nul-in-name": b"GET / HTTP/1.1\r\n" + H + b"X-\x00A: 1\r\n\r\n",
    "bare-cr-in-value": b"GET / HTTP/1.1\r\n" + H + b"X-A: a\rb\r\n\r\n",
    "space-in-target": b"GET /a b HTTP/1.1\r\n" + H + b"\r\n",
    "ctl-in-target": b"GET /a\x01 HTTP/1.1\r\n" + H + b"\r\n",
    "negative-length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: -1\r\n\r\n",
    "non-numeric-length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1x\r\n\r\nx",
    "plus-length": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: +1\r\n\r\nx",
    "length-overflow": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 99999999999999999999999\r\n\r\n",
    "chunk-size-overflow": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"fffffffffffffffff1\r\nx\r\n0\r\n\r\n",
    "chunk-size-not-hex": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"zz\r\nx\r\n0\r\n\r\n",
    "chunk-missing-crlf": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1\r\nab0\r\n\r\n",
    "chunk-ext-valid": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1;name=value\r\na\r\n0\r\n\r\n",
    "chunk-ext-invalid": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b'1;"x\x00"\r\na\r\n0\r\n\r\n',
    "chunk-size-space": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1 \r\na\r\n0\r\n\r\n",
    # -- smuggling and desync attempts -------------------------------------------------------
    "cl-and-te": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n"
    b"0\r\n\r\nGET /smuggled HTTP/1.1\r\n" + H + b"\r\n",
    "te-and-cl": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n"
    b"0\r\n\r\n",
    "duplicate-cl-differing": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 1\r\nContent-Length: 2\r\n\r\nab",
    "duplicate-cl-same": b"POST / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 2\r\nContent-Length: 2\r\n\r\nab",
    "cl-list": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 2, 2\r\n\r\nab",
    "te-with-space-before-colon": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding : chunked\r\n\r\n"
    b"0\r\n\r\n",
    "te-xchunked": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
    "te-chunked-comma-identity": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
    "te-identity-comma-chunked": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: identity, chunked\r\n\r\n0\r\n\r\n",
    "te-twice": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
    "te-vertical-tab": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding:\x0bchunked\r\n\r\n0\r\n\r\n",
    "te-in-http-1-0": b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na\r\n0\r\n\r\n",
    "obs-fold": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\r\n  folded\r\n\r\n",
    "obs-fold-te": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding:\r\n chunked\r\n\r\n0\r\n\r\n",
    "bare-lf-line-ends": b"GET / HTTP/1.1\nHost: t\n\n",
    "bare-lf-in-chunk": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1\na\r\n0\r\n\r\n",
    "bare-lf-after-header": b"GET / HTTP/1.1\r\n" + H + b"X-A: 1\n\r\n",
    "pipelined-smuggle-in-body": post(b"GET /x HTTP/1.1\r\nHost: t\r\n\r\n"),
    "get-with-body-then-request": b"GET / HTTP/1.1\r\n"
    + H
    + b"Content-Length: 3\r\n\r\nabc"
    + b"GET /b HTTP/1.1\r\n"
    + H
    + b"\r\n",
    "underscore-length-header": b"POST / HTTP/1.1\r\n" + H + b"Content_Length: 3\r\n\r\n",
    "cl-leading-zeros": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 003\r\n\r\nabc",
    "cl-space-inside": b"POST / HTTP/1.1\r\n" + H + b"Content-Length: 1 2\r\n\r\nx",
    "te-trailing-comma": b"POST / HTTP/1.1\r\n"
    + H
    + b"Transfer-Encoding: chunked,\r\n\r\n0\r\n\r\n",
    "te-quoted": b"POST / HTTP/1.1\r\n" + H + b'Transfer-Encoding: "chunked"\r\n\r\n0\r\n\r\n',
    "tab-before-colon": b"GET / HTTP/1.1\r\n" + H + b"X-A\t: 1\r\n\r\n",
    "empty-header-name": b"GET / HTTP/1.1\r\n" + H + b": x\r\n\r\n",
    "utf8-in-name": b"GET / HTTP/1.1\r\n" + H + "X-Zoë: 1\r\n\r\n".encode(),
    "double-space-request-line": b"GET  / HTTP/1.1\r\n" + H + b"\r\n",
    "lowercase-method": b"get / HTTP/1.1\r\n" + H + b"\r\n",
    "fragment-in-target": b"GET /a#b HTTP/1.1\r\n" + H + b"\r\n",
    "last-chunk-with-ext": b"POST / HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"1\r\na\r\n0;done\r\n\r\n",
    "chunked-then-pipelined": b"POST /a HTTP/1.1\r\n" + H + b"Transfer-Encoding: chunked\r\n\r\n"
    b"2\r\nab\r\n0\r\n\r\n" + post(b"c"),
    "upgrade-then-bytes": b"GET /ws HTTP/1.1\r\n"
    + H
    + b"Connection: Upgrade\r\nUpgrade: websocket\r\n\r\n\x81\x05hello",
}

_FRAMING = "a request a payswitch in front of a gateway could frame differently from it"

#: Cases payswitch refuses (400/505, nothing reaches the handler) where h11 accepts, on
#: purpose, and why. A proxy must not accept what the gateway behind it may read another
#: way: every ambiguity refused here is one request smuggling attempt that cannot work.
STRICTER: dict[str, str] = {
    "version-2": "HTTP/2.0 over an HTTP/1 connection is a probe, not a client: 505",
    "version-1-2": "no HTTP/1.2 exists; 505 rather than guess (RFC 9112 §2.6 allows it)",
    "ctl-in-value": "control bytes in a field value (RFC 9110 §5.5 forbids them)",
    "del-in-value": "DEL in a field value (not VCHAR nor obs-text, RFC 9110 §5.5)",
    "chunk-ext-invalid": "a NUL inside a chunk extension: " + _FRAMING,
    "chunk-size-space": "whitespace after a chunk size with no extension: " + _FRAMING,
    "cl-and-te": "Content-Length with Transfer-Encoding, the classic CL.TE smuggling "
    "vector (RFC 9112 §6.1 allows refusing; h11 reads the chunks and goes on)",
    "te-and-cl": "Transfer-Encoding with Content-Length, the TE.CL order of the same vector",
    "duplicate-cl-same": "two Content-Length fields, even equal: " + _FRAMING,
    "cl-list": "a Content-Length list ('2, 2'): " + _FRAMING,
    "obs-fold": "obsolete line folding (RFC 9112 §5.2: reject, or unfold; we reject)",
    "obs-fold-te": "a folded Transfer-Encoding: " + _FRAMING,
    "bare-lf-line-ends": "bare LF line ends (RFC 9112 §2.2 'MAY' accept): " + _FRAMING,
    "bare-lf-after-header": "a bare LF ending one field: " + _FRAMING,
    "lowercase-method": "methods are case-sensitive and 'get' is not one payswitch knows: "
    "llhttp parses only registered methods, and no route could match another",
}

#: Cases where payswitch serves what h11 does not, and why that is right.
LENIENT: dict[str, str] = {
    "leading-crlf": "RFC 9112 §2.2: a server SHOULD ignore an empty line before the "
    "request line (a client's stray CRLF after a body); h11 refuses it",
    "http-1-0-keep-alive-pair": "HTTP/1.0 clients asking for keep-alive get it; h11 "
    "supports keep-alive only on HTTP/1.1 and reads one request",
    "double-space-request-line": "RFC 9112 §3 lets a recipient split the request line on "
    "whitespace; payswitch writes its own request line to the gateway, so nothing of the "
    "client's spacing can be read another way downstream",
    "upgrade-then-bytes": "after declining an upgrade payswitch answers and closes, so the "
    "client's websocket frame is never read as HTTP; h11 parses it as the next request "
    "and refuses it",
}


def _normalized(requests: list[Parsed]) -> list[Parsed]:
    """h11 lowercases the Transfer-Encoding value it validated; payswitch passes it as
    sent (the handler drops it as hop-by-hop either way)."""
    return [
        (m, t, tuple((n, v.lower() if n == b"transfer-encoding" else v) for n, v in h), b)
        for m, t, h, b in requests
    ]


@pytest.mark.parametrize("case", list(CORPUS), ids=list(CORPUS))
async def test_payswitch_and_h11_agree(case: str) -> None:
    raw = CORPUS[case]
    ours = await payswitch_outcome(raw)
    reference = h11_outcome(raw)
    both = f"payswitch:\n{ours}\nh11:\n{reference}"
    same = ours.refused == reference.refused and _normalized(ours.requests) == _normalized(
        reference.requests
    )
    if case in STRICTER:
        assert ours.refused and not ours.requests, both
        assert not same, f"{case} is listed as a difference but both agree now:\n{both}"
    elif case in LENIENT:
        assert not ours.refused and ours.requests, both
        assert not same, f"{case} is listed as a difference but both agree now:\n{both}"
    else:
        assert same, both


def test_every_listed_difference_is_in_the_corpus() -> None:
    assert set(STRICTER) | set(LENIENT) <= set(CORPUS)
    assert not set(STRICTER) & set(LENIENT)
