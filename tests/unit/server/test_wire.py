"""Answer heads as bytes."""

from __future__ import annotations

import pytest

from proxy.server.wire import head, status_line


@pytest.mark.parametrize(
    ("args", "lines"),
    [
        ((200, {}, 3, False, False), [b"HTTP/1.1 200 OK", b"Content-Length: 3"]),
        ((200, {}, None, False, False, True), [b"Transfer-Encoding: chunked"]),
        ((503, {}, 0, True, False), [b"HTTP/1.1 503 Service Unavailable", b"Connection: close"]),
        ((200, {}, 0, False, True), [b"Connection: keep-alive"]),
        ((200, {"Date": "x", "X-A": "1"}, 0, False, False), [b"Date: x", b"X-A: 1"]),
    ],
    ids=["length", "chunked", "close", "http-1-0-keep-alive", "own-date"],
)
def test_heads_carry_the_framing_asked_for(args: tuple[object, ...], lines: list[bytes]) -> None:
    raw = head(*args)  # type: ignore[arg-type]
    got = raw.split(b"\r\n")
    assert raw.endswith(b"\r\n\r\n")
    for line in lines:
        assert line in got
    assert sum(line.startswith(b"Date: ") for line in got) == 1


@pytest.mark.parametrize(
    "headers",
    [{"X-A": "1\r\nX-Injected: 1"}, {"X-A\n": "1"}, {"X-A": "1\r"}],
    ids=["crlf-in-value", "lf-in-name", "cr-in-value"],
)
def test_a_header_that_would_split_the_head_is_refused(headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="CR or LF"):
        head(200, headers, 0, False, False)


@pytest.mark.parametrize(
    ("status", "line"),
    [(200, "HTTP/1.1 200 OK"), (299, "HTTP/1.1 299"), (404, "HTTP/1.1 404 Not Found")],
    ids=["known", "unknown", "not-found"],
)
def test_status_lines(status: int, line: str) -> None:
    assert status_line(status) == line
