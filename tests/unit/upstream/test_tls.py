"""TLS contexts for gateways: always verifying, built once when rules load, reused across
reloads while their files are unchanged; every bad setting or file a refused load that
names the file, the line and what is wrong."""

from __future__ import annotations

import os
import ssl
from pathlib import Path

import pytest
import trustme

from proxy.config.load import ConfigError, load_rules
from proxy.upstream.tls import TLSConfigError, client_context


@pytest.fixture
def files(tmp_path: Path) -> Path:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    leaf = ca.issue_cert("client@payswitch.example")
    leaf.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    leaf.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    trustme.CA().issue_cert("x").private_key_pem.write_to_path(str(tmp_path / "other.key"))
    (tmp_path / "garbage.pem").write_text("not a certificate\n")
    return tmp_path


def test_a_context_always_verifies(files: Path) -> None:
    for ctx in (client_context(), client_context(ca_file=str(files / "ca.pem"))):
        assert (ctx.verify_mode, ctx.check_hostname) == (ssl.CERT_REQUIRED, True)
        assert ctx.minimum_version == ssl.TLSVersion.TLSv1_2


def test_a_context_is_reused_until_its_files_change(files: Path) -> None:
    kw = {"ca_file": str(files / "ca.pem"), "client_cert": str(files / "client.pem")}
    kw["client_key"] = str(files / "client.key")
    first = client_context(**kw)
    assert client_context(**kw) is first  # a reload keeps the pooled TLS connections
    stat = os.stat(files / "client.pem")
    os.utime(files / "client.pem", (stat.st_atime, stat.st_mtime + 10))  # a rotation
    assert client_context(**kw) is not first


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"ca_file": "missing.pem"}, "cannot read"),
        ({"ca_file": "garbage.pem"}, "not a usable CA bundle"),
        ({"client_cert": "client.pem"}, "cannot load the certificate and key"),
        ({"client_cert": "client.pem", "client_key": "other.key"}, "cannot load"),
        ({"client_key": "client.key"}, "client_key needs client_cert"),
    ],
    ids=["missing-file", "not-a-ca", "cert-without-key", "key-mismatch", "key-alone"],
)
def test_bad_files_are_refused_naming_them(files: Path, kw: dict[str, str], message: str) -> None:
    with pytest.raises(TLSConfigError, match=message) as caught:
        client_context(**{k: str(files / v) for k, v in kw.items()})
    assert str(files / next(iter(kw.values()))) in str(caught.value) or "needs" in message


def rules(gateway: str) -> str:
    return f"""\
gateways:
  g1: {gateway}
routes:
  - {{name: r, match: {{path_prefix: /}}, region: {{default: eu}}, gateways: [g1]}}
"""


@pytest.mark.parametrize(
    ("gateway", "pointer", "message"),
    [
        (
            '{url: "https://gw.example", region: eu, tls: {ca_file: missing.pem}}',
            "/gateways/g1/tls",
            "missing.pem: No such file",
        ),
        (
            '{url: "https://gw.example", region: eu, tls: {ca_file: garbage.pem}}',
            "/gateways/g1/tls",
            "not a usable CA bundle",
        ),
        (
            '{url: "http://gw.example", region: eu, tls: {ca_file: ca.pem}}',
            "/gateways/g1/tls",
            "tls needs an https:// url",
        ),
        (
            '{url: "https://gw.example", region: eu, tls: {client_key: client.key}}',
            "/gateways/g1/tls",
            "'client_cert' is a dependency of 'client_key'",
        ),
        (
            '{url: "https://gw.example", region: eu, tls: {server_name: "a b"}}',
            "/gateways/g1/tls/server_name",
            "does not fit",
        ),
        (
            '{url: "https://gw.example", region: eu, tls: {verify: false}}',
            "/gateways/g1/tls/verify",
            "unknown key `verify`",
        ),
        (
            '{url: "http://gw.example", region: eu, limits: {max_connections: 0}}',
            "/gateways/g1/limits/max_connections",
            "must be at least 1",
        ),
    ],
    ids=[
        "missing-ca",
        "garbage-ca",
        "tls-on-http",
        "key-without-cert",
        "bad-server-name",
        "no-way-to-skip-verification",
        "zero-connections",
    ],
)
def test_bad_tls_rules_refuse_the_load(
    files: Path, gateway: str, pointer: str, message: str
) -> None:
    (files / "rules.yaml").write_text(rules(gateway))
    with pytest.raises(ConfigError) as caught:
        load_rules([files / "rules.yaml"])
    text = str(caught.value)
    assert f"rules.yaml:2: {pointer}" in text
    assert message in text


def test_tls_rules_load_with_paths_from_the_rules_folder(files: Path) -> None:
    tls = "{ca_file: ca.pem, server_name: gw.example, client_cert: client.pem, client_key: client.key}"
    (files / "rules.yaml").write_text(
        rules(
            f'{{url: "https://10.0.0.1", region: eu, tls: {tls}, limits: {{max_connections: 8}}}}'
        )
    )
    gw = load_rules([files / "rules.yaml"]).gateways["g1"]
    assert gw.tls is not None
    assert (gw.tls.ca_file, gw.tls.server_name) == (str(files / "ca.pem"), "gw.example")
    assert (gw.port, gw.limits.max_connections) == (443, 8)
    plain = '{url: "https://gw.example", region: eu}'
    (files / "rules.yaml").write_text(rules(plain))
    default = load_rules([files / "rules.yaml"]).gateways["g1"].tls
    assert default is not None and default.ca_file is None  # the system CAs, verified
