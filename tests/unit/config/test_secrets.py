"""Gateway credentials: read from files and the environment, never shown, never in a URL."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from proxy.config.load import ConfigError, load_rules
from proxy.config.model import Secret

SECRET = "sk_live_do-not-show-me"
ROUTES = """\
routes:
  - name: deposits
    match: {path_prefix: /v1/deposits}
    gateways: [stripe-eu]
"""


def rules_with(tmp_path: Path, gateway: str) -> Path:
    (tmp_path / "gateways.yaml").write_text(f"gateways:\n  stripe-eu:\n{gateway}")
    (tmp_path / "routes.yaml").write_text(ROUTES)
    return tmp_path


@pytest.mark.parametrize(
    ("gateway", "expected"),
    [
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {Authorization: {value_from: {file: SECRET_FILE}}}\n",
            [("Authorization", f"Bearer {SECRET}", "file:SECRET_FILE")],
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {X-Api-Key: {value_from: {env: STRIPE_KEY}}}\n",
            [("X-Api-Key", SECRET, "env:STRIPE_KEY")],
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {X-Merchant: {value: m-42}}\n",
            [("X-Merchant", "m-42", "rules")],
        ),
    ],
    ids=["from-file-newline-stripped", "from-env", "plain-value"],
)
def test_header_values_are_read_at_load(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, gateway: str, expected: list[tuple[str, ...]]
) -> None:
    secret_file = tmp_path / "secret"
    secret_file.write_text(f"Bearer {SECRET}\n")
    monkeypatch.setenv("STRIPE_KEY", SECRET)
    rules = load_rules([rules_with(tmp_path, gateway.replace("SECRET_FILE", str(secret_file)))])
    got = [(h.name, h.value.reveal(), h.origin) for h in rules.gateways["stripe-eu"].headers]
    assert got == [tuple(s.replace("SECRET_FILE", str(secret_file)) for s in e) for e in expected]
    gw = rules.gateways["stripe-eu"]
    assert SECRET not in repr(gw) and SECRET not in str(rules)
    assert SECRET not in json.dumps(dict(rules.raw))


@pytest.mark.parametrize(
    ("gateway", "line", "pointer", "message"),
    [
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {Authorization: {value_from: {file: /nonexistent/key}}}\n",
            5,
            "/gateways/stripe-eu/headers/Authorization/value_from",
            "header `Authorization`: cannot read /nonexistent/key: No such file or directory",
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {X-Api-Key: {value_from: {env: PAYSWITCH_NOT_SET}}}\n",
            5,
            "/gateways/stripe-eu/headers/X-Api-Key/value_from",
            "header `X-Api-Key`: environment variable PAYSWITCH_NOT_SET is not set",
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {X-Api-Key: {value_from: {env: EMPTY_KEY}}}\n",
            5,
            "/gateways/stripe-eu/headers/X-Api-Key/value_from",
            "header `X-Api-Key`: the value is empty",
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {X-Api-Key: {value_from: {env: SPLIT_KEY}}}\n",
            5,
            "/gateways/stripe-eu/headers/X-Api-Key/value_from",
            "header `X-Api-Key`: the value holds a line break or NUL, "
            "which would split the request head",
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n    headers: {Host: {value: evil}}\n",
            5,
            "/gateways/stripe-eu/headers/Host",
            "`Host` is set by payswitch and cannot be configured",
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {X-Payswitch-Transaction-Id: {value: t}}\n",
            5,
            "/gateways/stripe-eu/headers/X-Payswitch-Transaction-Id",
            "`X-Payswitch-Transaction-Id` is set by payswitch and cannot be configured",
        ),
        (
            f"    url: http://stripe:{SECRET}@127.0.0.1:9101\n    region: eu\n",
            3,
            "/gateways/stripe-eu/url",
            "credentials in the URL are not sent and would be shown; put them in a header "
            "instead, read from a Secret: "
            "headers: {Authorization: {value_from: {file: /var/run/secrets/NAME/KEY}}}",
        ),
        (
            f"    url: http://stripe:{SECRET}@127.0.0.1:9101/a b\n    region: eu\n",
            3,
            "/gateways/stripe-eu/url",
            "`http://…@127.0.0.1:9101/a b` does not fit: "
            "Base URL of the gateway: http(s)://host:port[/base-path].",
        ),
        (
            "    url: http://127.0.0.1:9101\n    region: eu\n"
            "    headers: {X-Api-Key: {value: a, value_from: {env: X}}}\n",
            5,
            "/gateways/stripe-eu/headers/X-Api-Key",
            "{'value': 'a', 'value_from': {'env': 'X'}} has too many properties",
        ),
    ],
    ids=[
        "missing-file",
        "missing-env",
        "empty-value",
        "value-with-newline",
        "framing-header",
        "payswitch-header",
        "userinfo-in-url",
        "userinfo-in-bad-url",
        "value-and-value-from",
    ],
)
def test_bad_credentials_are_refused_without_showing_them(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    gateway: str,
    line: int,
    pointer: str,
    message: str,
) -> None:
    monkeypatch.delenv("PAYSWITCH_NOT_SET", raising=False)
    monkeypatch.setenv("EMPTY_KEY", " \n")
    monkeypatch.setenv("SPLIT_KEY", f"{SECRET}\r\nX-Evil: 1")
    with pytest.raises(ConfigError) as caught:
        load_rules([rules_with(tmp_path, gateway)])
    got = [(Path(i.file).name, i.line, i.pointer, i.message) for i in caught.value.issues]
    assert got == [("gateways.yaml", line, pointer, message)]
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize(
    "show",
    [repr, str, format, lambda s: json.dumps({"v": s}, default=str)],
    ids=["repr", "str", "format", "json"],
)
def test_a_secret_shows_as_redacted(show: object) -> None:
    assert callable(show)
    text = show(Secret(SECRET))
    assert SECRET not in text and "<redacted>" in text


def test_secrets_compare_by_value_and_refuse_pickling() -> None:
    import pickle

    assert Secret("a") == Secret("a") and Secret("a") != Secret("b")
    with pytest.raises(TypeError):
        pickle.dumps(Secret(SECRET))


def test_a_gateway_header_cannot_replace_the_idempotency_key(tmp_path: Path) -> None:
    gateway = (
        "    url: http://127.0.0.1:9101\n    region: eu\n"
        "    headers: {idempotency-key: {value: fixed}}\n"
    )
    (tmp_path / "gateways.yaml").write_text(f"gateways:\n  stripe-eu:\n{gateway}")
    (tmp_path / "routes.yaml").write_text(ROUTES + "    idempotency: {header: Idempotency-Key}\n")
    with pytest.raises(ConfigError) as caught:
        load_rules([tmp_path])
    got = [(Path(i.file).name, i.line, i.pointer, i.message) for i in caught.value.issues]
    assert got == [
        (
            "routes.yaml",
            5,
            "/routes/0/idempotency",
            "gateway 'stripe-eu' sets the header `Idempotency-Key`, which carries this "
            "route's idempotency keys; payswitch sets it",
        )
    ]
