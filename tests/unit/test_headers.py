"""headers: what reaches a gateway of a client's headers, and a client of a gateway's."""

from __future__ import annotations

import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from proxy import headers as headers_module
from proxy.headers import (
    HeaderPolicy,
    hop_by_hop,
    parse_networks,
    response_headers,
    splits_a_line,
    upstream_headers,
)


def proxy_of(*items: tuple[str, str]) -> CIMultiDictProxy[str]:
    return CIMultiDictProxy(CIMultiDict(items))


TRUST_LOOPBACK = HeaderPolicy(trusted_proxies=parse_networks(["127.0.0.0/8", "::1"]))
KEEP_UNDERSCORES = HeaderPolicy(drop_underscores=False)
KEY = frozenset({"idempotency-key"})


@pytest.mark.parametrize(
    ("incoming", "client_ip", "policy", "owned", "expected"),
    [
        (
            [("Content-Type", "application/json"), ("Host", "proxy"), ("Content-Length", "2")],
            "10.0.0.1",
            HeaderPolicy(),
            frozenset(),
            [
                ("Content-Type", "application/json"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "proxy.local"),
            ],
        ),
        (
            [("Connection", "keep-alive, X-Hop"), ("X-Hop", "1"), ("TE", "trailers"), ("A", "1")],
            None,
            HeaderPolicy(),
            frozenset(),
            [("A", "1"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "proxy.local")],
        ),
        (
            [("Connection", "Idempotency-Key, X-Hop"), ("Idempotency-Key", "k1"), ("X-Hop", "1")],
            None,
            HeaderPolicy(),
            KEY,
            [
                ("Idempotency-Key", "k1"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "proxy.local"),
            ],
        ),
        (
            [
                ("X-Payswitch-Transaction-Id", "someone-elses"),
                ("x-payswitch-attempt-id", "a"),
                ("A", "1"),
            ],
            None,
            HeaderPolicy(),
            frozenset(),
            [("A", "1"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "proxy.local")],
        ),
        (
            [
                ("X-Forwarded-For", "1.1.1.1"),
                ("X-Forwarded-Proto", "https"),
                ("X-Forwarded-Host", "bank.example"),
                ("Forwarded", "for=1.1.1.1;proto=https"),
                ("X-Real-IP", "1.1.1.1"),
                ("A", "1"),
            ],
            "10.0.0.1",
            HeaderPolicy(),
            frozenset(),
            [
                ("A", "1"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "proxy.local"),
            ],
        ),
        (
            [
                ("X-Forwarded-For", "1.1.1.1"),
                ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=1.1.1.1;proto=https"),
                ("A", "1"),
            ],
            "127.0.0.1",
            TRUST_LOOPBACK,
            frozenset(),
            [
                ("X-Forwarded-For", "1.1.1.1, 127.0.0.1"),
                ("X-Forwarded-Proto", "https"),
                ("Forwarded", "for=1.1.1.1;proto=https"),
                ("A", "1"),
                ("X-Forwarded-Host", "proxy.local"),
            ],
        ),
        (
            [("X-Forwarded-Proto", "https"), ("A", "1")],
            "10.0.0.1",
            TRUST_LOOPBACK,
            frozenset(),
            [
                ("A", "1"),
                ("X-Forwarded-For", "10.0.0.1"),
                ("X-Forwarded-Proto", "http"),
                ("X-Forwarded-Host", "proxy.local"),
            ],
        ),
        (
            [("Content_Length", "5"), ("X_Custom", "1"), ("A", "1")],
            None,
            HeaderPolicy(),
            frozenset(),
            [("A", "1"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "proxy.local")],
        ),
        (
            [("X_Custom", "1")],
            None,
            KEEP_UNDERSCORES,
            frozenset(),
            [("X_Custom", "1"), ("X-Forwarded-Proto", "http"), ("X-Forwarded-Host", "proxy.local")],
        ),
    ],
    ids=[
        "framing-dropped",
        "hop-by-hop-dropped",
        "connection-cannot-strip-the-key",
        "client-payswitch-headers-dropped",
        "untrusted-forwarding-replaced",
        "trusted-forwarding-extended",
        "untrusted-peer-of-a-trusting-policy",
        "underscores-dropped",
        "underscores-allowed",
    ],
)
def test_upstream_headers(
    incoming: list[tuple[str, str]],
    client_ip: str | None,
    policy: HeaderPolicy,
    owned: frozenset[str],
    expected: list[tuple[str, str]],
) -> None:
    out = upstream_headers(
        proxy_of(*incoming),
        client_ip=client_ip,
        scheme="http",
        host="proxy.local",
        policy=policy,
        owned=owned,
    )
    assert list(out.items()) == expected


def test_hop_by_hop_sets_are_cached_per_connection_value_and_owned_set() -> None:
    headers = proxy_of(("Connection", "Idempotency-Key"))
    assert "idempotency-key" in hop_by_hop(headers)
    assert "idempotency-key" not in hop_by_hop(headers, KEY)


@pytest.mark.parametrize(
    ("text", "error"),
    [("10.0.0.0/8, ::1", None), ("", None), ("10.0.0.300", "not an IP address or CIDR")],
    ids=["cidrs", "empty", "bad"],
)
def test_parse_networks(text: str, error: str | None) -> None:
    if error is None:
        assert len(parse_networks(text.split(","))) == len([t for t in text.split(",") if t])
    else:
        with pytest.raises(ValueError, match=error):
            parse_networks(text.split(","))


def test_trust_is_decided_once_per_peer_and_bounded() -> None:
    policy = HeaderPolicy(trusted_proxies=parse_networks(["127.0.0.1"]))
    assert policy.trusts("127.0.0.1")
    assert not policy.trusts("127.0.0.2")
    assert not policy.trusts("not-an-ip")
    assert not policy.trusts(None)
    for i in range(5000):
        policy.trusts(f"10.0.{i // 256}.{i % 256}")
    assert len(policy._trust) <= 4096


def test_response_headers_drop_hop_by_hop_and_framing_but_keep_duplicates() -> None:
    gateway_headers = proxy_of(
        ("Set-Cookie", "a=1"),
        ("Connection", "close, X-Internal"),
        ("X-Internal", "secret"),
        ("Keep-Alive", "timeout=5"),
        ("Transfer-Encoding", "chunked"),
        ("Content-Length", "10"),
        ("Set-Cookie", "b=2"),
    )
    assert list(response_headers(gateway_headers).items()) == [
        ("Set-Cookie", "a=1"),
        ("Set-Cookie", "b=2"),
    ]


@pytest.mark.parametrize(
    ("client_ip", "policy", "forwarded_kept"),
    [
        ("127.0.0.1", TRUST_LOOPBACK, True),
        ("10.0.0.1", TRUST_LOOPBACK, False),
        ("127.0.0.1", HeaderPolicy(), False),
    ],
    ids=["trusted-peer", "untrusted-peer", "no-trusted-proxies"],
)
def test_name_verdicts_remembered_per_rule_set_never_leak_across_them(
    client_ip: str, policy: HeaderPolicy, forwarded_kept: bool
) -> None:
    incoming = proxy_of(("X-Real-IP", "1.2.3.4"), ("x_custom", "1"), ("X-Payswitch-Gateway", "g"))
    for _ in range(3):  # the first call decides each name, the next ones remember it
        out = upstream_headers(
            incoming, client_ip=client_ip, scheme="http", host=None, policy=policy
        )
        assert ("X-Real-IP" in out) is forwarded_kept
        assert "x_custom" not in out and "X-Payswitch-Gateway" not in out


def test_name_verdicts_stay_bounded_whatever_names_and_connection_values_arrive() -> None:
    for i in range(300):
        names = [(f"X-N{i}-{j}" + "x" * (j % 80), "v") for j in range(20)]
        upstream_headers(
            proxy_of(("Connection", f"X-C{i}"), (f"X-C{i}", "1"), *names),
            client_ip="10.0.0.1",
            scheme="http",
            host=None,
        )
    assert len(headers_module._VERDICTS) <= headers_module._RULE_SETS_KEPT
    for verdicts in headers_module._VERDICTS.values():
        assert len(verdicts) <= headers_module._NAMES_KEPT
        assert all(len(name) <= headers_module._NAME_KEPT_LEN for name in verdicts)
    out = upstream_headers(
        proxy_of(("Connection", "X-C299"), ("X-C299", "1"), ("X-N1-1x", "v")),
        client_ip="10.0.0.1",
        scheme="http",
        host=None,
    )
    assert "X-C299" not in out and out["X-N1-1x"] == "v"


@pytest.mark.parametrize(
    ("lines", "splits"),
    [
        (["POST /pay HTTP/1.1", "Host: gw", "X-A: 1"], False),
        (["POST /pay HTTP/1.1", "Host: gw", "X-A: 1\r\nX-B: 2"], True),
        (["POST /pay HTTP/1.1", "Host: gw", "X-A: 1\n"], True),
        (["POST /pay HTTP/1.1", "Host: gw", "X-A: \r1"], True),
        (["POST /pay\r\nHTTP/1.1", "Host: gw"], True),
        (["HTTP/1.1 200 OK", "X-\u00e9: caf\u00e9"], False),
        ([], False),
    ],
)
def test_a_cr_or_lf_anywhere_in_a_line_splits_it(lines: list[str], splits: bool) -> None:
    assert splits_a_line(lines) is splits
