"""Settings from flags and PAYSWITCH_* variables: the probes port and its clashes."""

from __future__ import annotations

import pytest

from proxy.settings import from_sources

GOOD = {
    "unset": ({}, {}, None),
    "env": ({}, {"PAYSWITCH_PROBES": "0.0.0.0:9102"}, ("0.0.0.0", 9102)),
    "flag beats env": (
        {"probes": "127.0.0.1:9200"},
        {"PAYSWITCH_PROBES": ":9102"},
        ("127.0.0.1", 9200),
    ),
    "host defaults to every address": ({"probes": ":9102"}, {}, ("0.0.0.0", 9102)),
}


@pytest.mark.parametrize(("flags", "env", "expected"), GOOD.values(), ids=GOOD)
def test_probes_address(
    flags: dict[str, object], env: dict[str, str], expected: tuple[str, int] | None
) -> None:
    assert from_sources(flags, env).probes == expected


BAD = {
    "no port": ({"probes": "0.0.0.0"}, "expected HOST:PORT"),
    "port out of range": ({"probes": ":70000"}, "expected HOST:PORT"),
    "same as admin": ({"probes": ":9901"}, "already the admin port"),
    "same as listen": ({"probes": ":8080"}, "already the listen port"),
    "same as moved admin": ({"admin": "127.0.0.1:9500", "probes": ":9500"}, "admin port"),
}


@pytest.mark.parametrize(("flags", "message"), BAD.values(), ids=BAD)
def test_probes_address_refused(flags: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        from_sources(flags, {})
