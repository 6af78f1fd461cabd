from __future__ import annotations

import orjson
import pytest

from proxy.kafka.commands import MAX_VALUE_BYTES, Command, CommandError, parse_command

NOW = 1_700_000_000.0  # 2023-11-14T22:13:20Z
LATER = "2023-11-15T00:00:00Z"


def cmd(**kw: object) -> bytes:
    doc: dict[str, object] = {
        "target": "gateway/stripe-eu",
        "action": "drain",
        "issuer": "ops@example.com",
        "reason": "incident",
        "expires_at": LATER,
    }
    doc.update(kw)
    return orjson.dumps({k: v for k, v in doc.items() if v is not None})


@pytest.mark.parametrize(
    ("key", "value", "action", "weight"),
    [
        ("gateway/stripe-eu", cmd(), "drain", None),
        ("gateway/stripe-eu", cmd(action="undrain"), "undrain", None),
        ("gateway/stripe-eu", cmd(action="weight", weight=0.5), "weight", 0.5),
        ("route/deposits", cmd(target="route/deposits", action="disable"), "disable", None),
        ("route/deposits", cmd(target="route/deposits", action="enable"), "enable", None),
    ],
    ids=["drain", "undrain", "weight", "disable", "enable"],
)
def test_valid_commands(key: str, value: bytes, action: str, weight: float | None) -> None:
    c = parse_command(key.encode(), value, NOW)
    assert isinstance(c, Command)
    assert (c.target, c.action, c.weight) == (key, action, weight)
    assert c.expires_at == 1_700_006_400.0
    assert c.name == key.partition("/")[2]


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        (None, cmd(), "no key"),
        (b"gateway/other", cmd(), "does not match the record key"),
        (b"gateway/stripe-eu", b"{nope", "not JSON"),
        (b"gateway/stripe-eu", cmd(issuer=None), "'issuer' is a required property"),
        (b"gateway/stripe-eu", cmd(reason=""), "/reason"),
        (b"gateway/stripe-eu", cmd(action="disable"), "/action"),
        (b"route/deposits", cmd(target="route/deposits"), "/action"),
        (b"gateway/stripe-eu", cmd(action="weight"), "'weight' is a required property"),
        (b"gateway/stripe-eu", cmd(weight=2), "should not be valid"),
        (b"gateway/stripe-eu", cmd(action="weight", weight=0), "/weight"),
        (b"gateway/stripe-eu", cmd(expires_at="tomorrow"), "/expires_at"),
        (b"gateway/stripe-eu", cmd(expires_at="2023-11-14T22:00:00Z"), "already passed"),
        (b"gateway/stripe-eu", cmd(expires_at="2023-12-01T00:00:00Z"), "more than 7 days"),
        (b"gateway/stripe-eu", cmd(extra=1), "Additional properties"),
        (b"gateway/bad name", cmd(target="gateway/bad name"), "/target"),
        (b"gateway/stripe-eu", b" " * (MAX_VALUE_BYTES + 1), "at most"),
        (b"gateway/stripe-eu", b"[1, 2]", "is not of type 'object'"),
    ],
    ids=[
        "no-key",
        "key-mismatch",
        "not-json",
        "no-issuer",
        "empty-reason",
        "route-action-on-gateway",
        "gateway-action-on-route",
        "weight-missing",
        "weight-on-drain",
        "weight-zero",
        "expiry-unparsable",
        "expired",
        "too-far",
        "unknown-field",
        "bad-target",
        "too-large",
        "not-object",
    ],
)
def test_invalid_commands_say_why(key: bytes | None, value: bytes, message: str) -> None:
    with pytest.raises(CommandError, match=message):
        parse_command(key, value, NOW)
