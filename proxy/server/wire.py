"""Answer heads as bytes: the status line, the fields, the framing and Date.

Owns: serialising an answer's head once, with the framing the listener chose, and refusing
a header that would split the head (CR or LF in a name or value).
Must not: decide framing or keep-alive (the request cycle does) or write to a socket.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import formatdate
from http import HTTPStatus
from typing import Any, cast

from proxy.headers import splits_a_line

_STATUS_LINES: dict[int, str] = {}


def status_line(status: int) -> str:
    line = _STATUS_LINES.get(status)
    if line is None:
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        line = f"HTTP/1.1 {status} {phrase}".rstrip()
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


_date: list[Any] = [0, ""]


def date_line() -> str:
    """The Date field, formatted once a second."""
    now = int(time.time())
    if _date[0] != now:
        _date[0], _date[1] = now, "Date: " + formatdate(now, usegmt=True)
    return cast(str, _date[1])


def head(
    status: int,
    headers: Mapping[str, str],
    length: int | None,
    close: bool,
    keep10: bool,
    chunked: bool = False,
) -> bytes:
    """The answer's head: Content-Length when `length` is known, else chunked framing
    when asked; `Connection: close` or, for an HTTP/1.0 client kept alive, keep-alive."""
    lines = [status_line(status)]
    for k, v in headers.items():  # a third cheaper compiled than `map(": ".join, ...)`
        lines.append(f"{k}: {v}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    elif chunked:
        lines.append("Transfer-Encoding: chunked")
    if "Date" not in headers:
        lines.append(date_line())
    if close:
        lines.append("Connection: close")
    elif keep10:
        lines.append("Connection: keep-alive")
    if splits_a_line(lines):
        raise ValueError("CR or LF inside a response header")
    lines.append("\r\n")
    return "\r\n".join(lines).encode("utf-8", "surrogateescape")
