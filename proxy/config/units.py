"""Parsing of the human units the rules are written in: durations, sizes and rates.

Owns: the string forms (`250ms`, `2s`, `1m`, `1h`, `1MiB`, `200/s`) and their parsers.
Must not: know about files or schemas; the loader wraps errors with file and line.
"""

from __future__ import annotations

import re

#: How each form is described in error messages, with examples.
DURATION_FORM = "a duration like 250ms, 2s, 1m, 24h (one number, one unit: ms, s, m, h, d)"
SIZE_FORM = "a size like 64KiB, 1MiB, or a number of bytes"
RATE_FORM = "a rate like 200/s, 600/m, or a number per second"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_SIZE_UNITS = {
    None: 1,
    "B": 1,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "k": 1024,
    "K": 1024,
    "M": 1024**2,
    "G": 1024**3,
}
_RATE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """Seconds in a duration such as `250ms`, `2s`, `1.5m`; a bare number is seconds."""
    if isinstance(text, bool):
        raise ValueError(f"not a duration: {text!r}")
    if isinstance(text, int | float):
        if text < 0:
            raise ValueError(f"a duration cannot be negative: {text!r}")
        return float(text)
    m = _DURATION.match(text)
    if m is None:
        raise ValueError(f"`{text}` is not {DURATION_FORM}")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(text: str | int) -> int:
    """Bytes in a size such as `1MiB`, `64KiB` or a bare number of bytes."""
    if isinstance(text, bool):
        raise ValueError(f"not a size: {text!r}")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"a size cannot be negative: {text!r}")
        return text
    m = _SIZE.match(text)
    if m is None:
        raise ValueError(f"`{text}` is not {SIZE_FORM}")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2)]


def parse_rate(text: str | int | float) -> float:
    """Events per second in a rate such as `200/s`, `600/m`; a bare number is per second."""
    if isinstance(text, bool):
        raise ValueError(f"not a rate: {text!r}")
    if isinstance(text, int | float):
        if text <= 0:
            raise ValueError(f"a rate must be positive: {text!r}")
        return float(text)
    m = _RATE.match(text)
    if m is None:
        raise ValueError(f"`{text}` is not {RATE_FORM}")
    value = float(m.group(1)) / _RATE_UNITS[m.group(2)]
    if value <= 0:
        raise ValueError(f"a rate must be positive: {text!r}")
    return value
