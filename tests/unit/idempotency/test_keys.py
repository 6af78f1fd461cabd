"""validate_key, scoped_key and fingerprint: what counts as a key and as the same request."""

from __future__ import annotations

import hashlib

import pytest

from proxy.idempotency.keys import (
    MAX_KEY_LENGTH,
    InvalidIdempotencyKey,
    fingerprint,
    gateway_key,
    scoped_key,
    validate_key,
)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("8e03978e-40d5-43e8-bc93-6894a57f9324", "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ('"8e03978e-40d5-43e8-bc93-6894a57f9324"', "8e03978e-40d5-43e8-bc93-6894a57f9324"),
        ("  abc\t", "abc"),
        ('  "abc" ', "abc"),
        ("a", "a"),
        ("x" * MAX_KEY_LENGTH, "x" * MAX_KEY_LENGTH),
        ("01HZX3Q7V8M2-_.~!#$%&()*+,/:;<=>?@[]^`{|}", "01HZX3Q7V8M2-_.~!#$%&()*+,/:;<=>?@[]^`{|}"),
    ],
    ids=[
        "uuid",
        "sf-string-quoted",
        "ows-trimmed",
        "quoted-with-ows",
        "one-char",
        "max-len",
        "punct",
    ],
)
def test_accepted_keys(raw: str, expected: str) -> None:
    assert validate_key(raw) == expected


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("", "empty"),
        ("   ", "empty"),
        ('""', "empty"),
        ("x" * (MAX_KEY_LENGTH + 1), "256 characters long"),
        ('"' + "x" * (MAX_KEY_LENGTH + 1) + '"', "256 characters long"),
        ("a b", "' ' at position 1"),
        ("a\tb", "'\\t' at position 1"),
        ("ab\x00", "'\\x00' at position 2"),
        ("ab\x7f", "'\\x7f' at position 2"),
        ('a"b', "'\"' at position 1"),
        ("a'b", '"\'" at position 1'),
        ("a\\b", "'\\\\' at position 1"),
        ('"abc', "'\"' at position 0"),
        ("caf\u00e9", "U+00E9 at position 3"),
        ("key\u2028", "U+2028 at position 3"),
    ],
    ids=[
        "empty",
        "blank",
        "empty-quoted",
        "too-long",
        "too-long-quoted",
        "space",
        "tab-inside",
        "nul",
        "del",
        "double-quote",
        "single-quote",
        "backslash",
        "unbalanced-quote",
        "non-ascii",
        "line-separator",
    ],
)
def test_refused_keys_say_why(raw: str, reason: str) -> None:
    with pytest.raises(InvalidIdempotencyKey) as caught:
        validate_key(raw)
    assert reason in str(caught.value)
    assert str(caught.value).startswith("invalid idempotency key: ")
    assert isinstance(caught.value, ValueError)


def test_scoped_keys_never_collide() -> None:
    pairs: list[tuple[str, str | None]] = [
        ("abc", None),
        ("abc", ""),
        ("abc", "alice"),
        ("abc", "bob"),
        ("c:abc", "alice:"),  # tries to spell ("abc", "alice:c") and friends
        ("abc", "alice:c"),
        ("k:abc", None),
        ("abc", "k"),
        ("5:alice:abc", None),
    ]
    spelled = [scoped_key(key, scope) for key, scope in pairs]
    assert len(set(spelled)) == len(pairs), spelled


def test_scoped_key_is_stable() -> None:
    assert scoped_key("abc", "alice") == scoped_key("abc", "alice")
    assert scoped_key("abc", None) == "k:abc"


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("post", "/v1/deposits", b"{}"), ("POST", "/v1/deposits", b"{}")),
        (("POST", "", b"x"), ("POST", "/", b"x")),
        (("POST", "/v1/deposits?", b"x"), ("POST", "/v1/deposits", b"x")),
        (("POST", "?", b"x"), ("POST", "/", b"x")),
    ],
    ids=["method-case", "empty-path", "bare-question-mark", "only-question-mark"],
)
def test_trivially_equal_requests_share_a_fingerprint(
    a: tuple[str, str, bytes], b: tuple[str, str, bytes]
) -> None:
    assert fingerprint(*a) == fingerprint(*b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (("POST", "/v1/deposits", b'{"amount":1}'), ("POST", "/v1/deposits", b'{"amount":2}')),
        (("POST", "/v1/deposits", b""), ("PUT", "/v1/deposits", b"")),
        (("POST", "/v1/deposits?a=1&b=2", b""), ("POST", "/v1/deposits?b=2&a=1", b"")),
        (("POST", "/v1/a%2Fb", b""), ("POST", "/v1/a/b", b"")),
        (("POST", "/v1/deposits/", b""), ("POST", "/v1/deposits", b"")),
        (("POST", "/ab", b"c"), ("POST", "/a", b"bc")),
        (("POS", "T/a", b""), ("POST", "/a", b"")),
    ],
    ids=[
        "body",
        "method",
        "query-order",
        "percent-encoding",
        "trailing-slash",
        "path-body-boundary",
        "method-path-boundary",
    ],
)
def test_different_requests_get_different_fingerprints(
    a: tuple[str, str, bytes], b: tuple[str, str, bytes]
) -> None:
    assert fingerprint(*a) != fingerprint(*b)


def test_fingerprint_is_sha256_hex_and_not_the_bare_body_hash() -> None:
    fp = fingerprint("POST", "/v1/deposits", b"{}")
    assert len(fp) == 64
    int(fp, 16)
    assert fp != hashlib.sha256(b"{}").hexdigest()
    assert fp == fingerprint("POST", "/v1/deposits", b"{}")


def test_fingerprint_accepts_undecodable_path_characters() -> None:
    assert fingerprint("POST", "/v1/\udcff", b"") != fingerprint("POST", "/v1/\udcfe", b"")


def test_gateway_key_is_the_key_unscoped_and_a_stable_digest_scoped() -> None:
    assert gateway_key("order-1", None) == "order-1"
    alice = gateway_key("order-1", "alice")
    bob = gateway_key("order-1", "bob")
    assert alice != bob
    assert alice == gateway_key("order-1", "alice")  # every retry, every replica
    assert alice.startswith("ps1-") and len(alice) == 64
    assert validate_key(alice) == alice
    # Length-prefixed: moving characters between scope and key changes the result.
    assert gateway_key("b:c", "a") != gateway_key("c", "a:b")
