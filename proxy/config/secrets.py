"""Gateway credentials: header values read from files or environment variables at load time.

Owns: reading each gateway's `headers` (a Kubernetes Secret mounted as a file, or exposed as
an environment variable) into `Secret` values, refusing names payswitch owns, and refusing
credentials written into a gateway URL. No message made here ever holds a secret value.
Must not: cache values across loads (a reload must see a rotated Secret) or add the
headers to requests (`proxy.forward` does, from the model).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import SplitResult

from proxy.config import model
from proxy.config.issues import ConfigIssue, Doc

#: Longest secret file read; credentials are short, and a wrong path must not read a disk.
MAX_SECRET_BYTES = 16 * 1024

#: Headers that frame or route the request, or that payswitch itself sets.
RESERVED = frozenset(
    {
        "host",
        "content-length",
        "transfer-encoding",
        "connection",
        "keep-alive",
        "te",
        "trailer",
        "upgrade",
        "proxy-connection",
    }
)
RESERVED_PREFIX = "x-payswitch-"

HOW_TO = (
    "put them in a header instead, read from a Secret: "
    "headers: {Authorization: {value_from: {file: /var/run/secrets/NAME/KEY}}}"
)


def url_credentials(parts: SplitResult) -> str | None:
    """The problem with a URL carrying `user:password@`, worded without the password."""
    if parts.username is None and parts.password is None:
        return None
    return f"credentials in the URL are not sent and would be shown; {HOW_TO}"


def gateway_headers(
    doc: Doc,
    where: list[object],
    spec: Mapping[str, Any],
    issues: list[ConfigIssue],
    *,
    read: bool = True,
) -> tuple[model.GatewayHeader, ...]:
    """The headers of one gateway; with `read` False, values from files and the
    environment are not read (an empty placeholder stands in for each)."""
    out: list[model.GatewayHeader] = []
    for name, source in spec.items():
        at = [*where, name]
        lowered = name.lower()
        if lowered in RESERVED or lowered.startswith(RESERVED_PREFIX):
            issues.append(doc.issue(at, f"`{name}` is set by payswitch and cannot be configured"))
            continue
        if "value" in source:
            out.append(
                model.GatewayHeader(name=name, value=model.Secret(source["value"]), origin="rules")
            )
            continue
        value_from = source["value_from"]
        if not read:
            origin = (
                f"file:{value_from['file']}" if "file" in value_from else f"env:{value_from['env']}"
            )
            out.append(model.GatewayHeader(name=name, value=model.Secret(""), origin=origin))
            continue
        if "file" in value_from:
            value, problem, origin = _from_file(value_from["file"])
        else:
            value, problem, origin = _from_env(value_from["env"])
        if problem is None and value is not None:
            problem = _bad_value(value)
        if problem is not None or value is None:
            issues.append(doc.issue([*at, "value_from"], f"header `{name}`: {problem}"))
            continue
        out.append(model.GatewayHeader(name=name, value=model.Secret(value), origin=origin))
    return tuple(out)


def _from_file(path: str) -> tuple[str | None, str | None, str]:
    origin = f"file:{path}"
    try:
        with Path(path).open("rb") as fh:
            data = fh.read(MAX_SECRET_BYTES + 1)
    except OSError as exc:
        return None, f"cannot read {path}: {exc.strerror or type(exc).__name__}", origin
    if len(data) > MAX_SECRET_BYTES:
        return None, f"{path} is longer than {MAX_SECRET_BYTES:,} bytes", origin
    try:
        # Secret files usually end with a newline that is not part of the value.
        return data.decode("utf-8").strip(), None, origin
    except UnicodeDecodeError:
        return None, f"{path} is not UTF-8 text", origin


def _from_env(name: str) -> tuple[str | None, str | None, str]:
    origin = f"env:{name}"
    value = os.environ.get(name)
    if value is None:
        return None, f"environment variable {name} is not set", origin
    return value.strip(), None, origin


def _bad_value(value: str) -> str | None:
    if not value:
        return "the value is empty"
    if any(c in value for c in "\r\n\0"):
        return "the value holds a line break or NUL, which would split the request head"
    if len(value) > 8192:
        return "the value is longer than 8,192 characters"
    return None
