"""Idempotency keys as the stores see them: validated, scoped, and paired with a fingerprint.

Owns: `validate_key` (what a client may send in the idempotency header), `scoped_key`
(the store key for a key and an optional client scope) and `fingerprint` (what "the same
request" means), with the typed errors they raise.
Must not: touch a store, read headers off a request or decide HTTP statuses; the request
path maps `InvalidIdempotencyKey` to a 400 in the one place errors become responses.

Accepted keys (decided here, published to clients):

* 1 to 255 characters after one optional pair of surrounding double quotes is removed. The
  IETF draft (draft-ietf-httpapi-idempotency-key-header) makes the header an RFC 8941
  string, sent quoted (`"8e03978e-..."`); Stripe-style clients send it bare. Both spell
  the same key, so `"abc"` and `abc` are one key.
* Only visible ASCII, 0x21 to 0x7E, except the double quote, the single quote and the
  backslash: no spaces, no control characters, nothing that needs escaping in logs, JSON
  or Redis key patterns. UUIDs, ULIDs, base64url and hex tokens all pass.
* Leading and trailing spaces or tabs are optional whitespace around an HTTP field value
  (RFC 9110 §5.5) and are dropped before checking; anything inside is refused.
"""

from __future__ import annotations

import hashlib
import logging

logger = logging.getLogger(__name__)

MAX_KEY_LENGTH = 255

_FORBIDDEN = frozenset("\"'\\")
_FINGERPRINT_DOMAIN = b"payswitch-idempotency-fingerprint-v1\0"


class InvalidIdempotencyKey(ValueError):
    """The client sent an idempotency key this proxy does not accept."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"invalid idempotency key: {reason}")
        self.reason = reason


def validate_key(raw: str) -> str:
    """The key `raw` spells, or `InvalidIdempotencyKey` saying what is wrong with it."""
    value = raw.strip(" \t")
    if len(value) >= 2 and value[0] == '"' and value[-1] == '"':
        value = value[1:-1]
    if not value:
        raise InvalidIdempotencyKey("it is empty")
    if len(value) > MAX_KEY_LENGTH:
        raise InvalidIdempotencyKey(
            f"it is {len(value)} characters long; at most {MAX_KEY_LENGTH} are allowed"
        )
    for index, char in enumerate(value):
        code = ord(char)
        if code < 0x21 or code > 0x7E or char in _FORBIDDEN:
            shown = repr(char) if code < 0x80 else f"U+{code:04X}"
            raise InvalidIdempotencyKey(
                f"character {shown} at position {index} is not allowed; use visible ASCII "
                "without spaces, quotes or backslashes"
            )
    return value


def scoped_key(key: str, scope: str | None) -> str:
    """The store key for `key` sent by the client identified by `scope` (None: unscoped).

    The scope is length-prefixed so no (scope, key) pair can spell another pair's store key,
    whatever characters the scope header carries. Routes are deliberately not part of it: a
    key names one logical payment for a client, whichever route it arrives on.
    """
    if scope is None:
        return f"k:{key}"
    return f"s{len(scope)}:{scope}:{key}"


_GATEWAY_KEY_DOMAIN = b"payswitch-gateway-key-v1\0"


def gateway_key(key: str, scope: str | None) -> str:
    """The idempotency key the gateway gets for `key` sent by the client `scope`.

    Unscoped, it is the client's key as sent. Scoped, two clients may both send `order-1`
    for different payments, and a provider that dedupes by key alone would merge them: the
    gateway gets `ps1-` and 60 hex digits of SHA-256 over the length-prefixed scope and key,
    the same on every retry and every replica, short and plain enough for any provider's
    key rules (Stripe's are 255 characters).
    """
    if scope is None:
        return key
    digest = hashlib.sha256(_GATEWAY_KEY_DOMAIN)
    for part in (scope.encode("utf-8", "surrogateescape"), key.encode()):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return "ps1-" + digest.hexdigest()[:60]


def fingerprint(method: str, path_with_query: str, body: bytes) -> str:
    """Hex SHA-256 naming what a request asks for, so a reused key with new content is caught.

    Normalisation is deliberately trivial: the method is upper-cased, an empty path becomes
    "/", and a "?" with nothing after it is dropped. The query is not reordered and the path
    not decoded: two spellings a gateway might treat differently must not count as one.
    Each part is length-prefixed so moving bytes between path and body changes the result.
    """
    path = path_with_query or "/"
    if path.endswith("?"):
        path = path[:-1] or "/"
    method_bytes = method.upper().encode("utf-8", "surrogateescape")
    path_bytes = path.encode("utf-8", "surrogateescape")
    digest = hashlib.sha256(_FINGERPRINT_DOMAIN)
    for part in (method_bytes, path_bytes):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    digest.update(body)
    return digest.hexdigest()
