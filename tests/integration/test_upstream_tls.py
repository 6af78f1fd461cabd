"""HTTPS to gateways against a local TLS gateway (aiohttp with ssl) and a test CA (trustme):
verification, SNI, mutual TLS, pooled TLS connections, and a certificate that does not
verify being a connect failure the next gateway makes up for — never a bypass.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import textwrap
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import trustme
import uvloop

from proxy.config.load import build_rules
from proxy.config.model import Gateway
from proxy.upstream.client import UpstreamClient
from proxy.upstream.phase import Phase, Progress
from proxy.upstream.state import Flag, Outcome
from tests.integration.upstream_support import HOST, aiohttp_gateway, attempt, failure
from tests.support import eventually, running_proxy


@dataclass
class Pki:
    """A test CA with a gateway certificate, another CA, and a client certificate."""

    folder: Path
    ca: trustme.CA = field(default_factory=trustme.CA)
    other_ca: trustme.CA = field(default_factory=trustme.CA)
    client_ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.ca.cert_pem.write_to_path(str(self.folder / "ca.pem"))
        self.other_ca.cert_pem.write_to_path(str(self.folder / "other-ca.pem"))
        client = self.client_ca.issue_cert("client@payswitch.example")
        client.cert_chain_pems[0].write_to_path(str(self.folder / "client.pem"))
        client.private_key_pem.write_to_path(str(self.folder / "client.key"))
        self.server = self.ca.issue_cert(HOST, "gw.example")

    def server_context(self, *, require_client_cert: bool = False) -> ssl.SSLContext:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self.server.configure_cert(ctx)
        if require_client_cert:
            ctx.verify_mode = ssl.CERT_REQUIRED
            self.client_ca.configure_trust(ctx)
        return ctx

    def path(self, name: str) -> str:
        return str(self.folder / name)


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path)


def tls_gateway(folder: Path, port: int, tls: str | None, name: str = "g1") -> Gateway:
    """The gateway as the rules loader builds it (its TLS context made at load time)."""
    block = f", tls: {tls}" if tls is not None else ""
    text = f"""
        gateways:
          {name}: {{url: "https://{HOST}:{port}", region: eu{block}}}
        routes:
          - {{name: r, match: {{path_prefix: /}}, region: {{default: eu}}, gateways: [{name}]}}
    """
    rules = build_rules([(str(folder / "rules.yaml"), textwrap.dedent(text).encode())])
    return rules.gateways[name]


@contextlib.asynccontextmanager
async def tls_server(ctx: ssl.SSLContext) -> AsyncIterator[tuple[int, list[str | None]]]:
    """A TLS gateway, and the SNI name of every handshake it took."""
    handshakes: list[str | None] = []

    def sni(sock: Any, name: str | None, _ctx: ssl.SSLContext) -> None:
        handshakes.append(name)

    ctx.sni_callback = sni
    async with aiohttp_gateway(ctx) as port:
        yield port, handshakes


async def test_verified_and_pooled_one_handshake(pki: Pki) -> None:
    client = UpstreamClient()
    async with tls_server(pki.server_context()) as (port, handshakes):
        gw = tls_gateway(pki.folder, port, "{ca_file: ca.pem}")  # relative to the rules file
        replies = [await attempt(client, port, gw=gw) for _ in range(5)]
        assert [r.status for r in replies] == [200] * 5
        ports = {orjson.loads(r.body or b"")["port"] for r in replies}
        assert (len(ports), handshakes) == (1, [None])  # one connection, one handshake
        assert gw.tls is not None
        assert client.open_count(("https", HOST, port), gw.tls.context) == 1
    await client.close()


@pytest.mark.parametrize(
    ("tls", "error"),
    [
        (None, "CERTIFICATE_VERIFY_FAILED"),  # the system CAs do not know the test CA
        ("{ca_file: other-ca.pem}", "CERTIFICATE_VERIFY_FAILED"),
        ("{ca_file: ca.pem, server_name: other.example}", "Hostname mismatch"),
    ],
    ids=["system-cas", "wrong-ca", "wrong-name"],
)
async def test_a_certificate_that_does_not_verify_is_a_connect_failure(
    pki: Pki, tls: str | None, error: str
) -> None:
    client = UpstreamClient()
    async with tls_server(pki.server_context()) as (port, _):
        gw = tls_gateway(pki.folder, port, tls)
        progress = Progress()
        failed = await failure(client, port, gw=gw, progress=progress)
        assert (failed.outcome, failed.sent) == (Outcome.CONNECT_FAILURE, False)
        assert progress.phase is Phase.CONNECTING  # the handshake is part of connecting
        assert error in failed.detail
        assert client.open_count(("https", HOST, port), gw.tls.context if gw.tls else None) == 0
    await client.close()


async def test_server_name_sets_sni_and_the_name_checked(pki: Pki) -> None:
    client = UpstreamClient()
    async with tls_server(pki.server_context()) as (port, handshakes):
        gw = tls_gateway(pki.folder, port, "{ca_file: ca.pem, server_name: gw.example}")
        reply = await attempt(client, port, gw=gw)
        assert (reply.status, handshakes) == (200, ["gw.example"])
    await client.close()


async def test_mutual_tls(pki: Pki) -> None:
    client = UpstreamClient()
    async with tls_server(pki.server_context(require_client_cert=True)) as (port, _):
        given = "{ca_file: ca.pem, client_cert: client.pem, client_key: client.key}"
        gw = tls_gateway(pki.folder, port, given)
        assert (await attempt(client, port, gw=gw)).status == 200
    await client.close()


@contextlib.contextmanager
def refusing_tls_server(ctx: ssl.SSLContext) -> Iterator[int]:
    """A TLS gateway whose TLS layer refuses the handshake and says so with an alert, the
    way nginx or Envoy do, before it closes the connection."""
    listener = socket.socket()
    listener.bind((HOST, 0))
    listener.listen()

    def serve() -> None:
        conn, _ = listener.accept()
        with ctx.wrap_socket(conn, server_side=True, do_handshake_on_connect=False) as tls:
            with contextlib.suppress(OSError):
                tls.do_handshake()
            time.sleep(0.2)  # the alert is out; the close comes later

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield listener.getsockname()[1]
    finally:
        listener.close()
        thread.join(5)


@pytest.mark.parametrize("version", ["TLSv1_2", "TLSv1_3"])
async def test_a_client_certificate_refused_is_a_connect_failure(pki: Pki, version: str) -> None:
    ctx = pki.server_context(require_client_cert=True)
    ctx.maximum_version = ctx.minimum_version = ssl.TLSVersion[version]
    client = UpstreamClient()
    with refusing_tls_server(ctx) as port:
        gw = tls_gateway(pki.folder, port, "{ca_file: ca.pem}")
        failed = await failure(client, port, gw=gw)
        # In TLS 1.3 the refusal comes after the request was written, but the gateway's
        # TLS layer never let its application read it: provably unsent all the same.
        assert (failed.outcome, failed.sent) == (Outcome.CONNECT_FAILURE, False)
    await client.close()


async def test_an_unverified_gateway_is_failed_over_through_payswitch(
    pki: Pki, tmp_path: Path
) -> None:
    async with (
        tls_server(pki.server_context()) as (bad, _),
        tls_server(pki.server_context()) as (good, _),
    ):
        rules = f"""
            gateways:
              g1: {{url: "https://{HOST}:{bad}", region: eu, weight: 99,
                   tls: {{ca_file: "{pki.path("other-ca.pem")}"}}}}
              g2: {{url: "https://{HOST}:{good}", region: eu,
                   tls: {{ca_file: "{pki.path("ca.pem")}"}}}}
            routes:
              - name: pay
                match: {{path_prefix: /, methods: [POST]}}
                region: {{default: eu}}
                gateways: [g1, g2]
                retry: {{attempts: 1, on: [connect-failure], after_ambiguous: never}}
        """
        async with running_proxy(rules, tmp_path) as proxy:
            for _ in range(3):
                status, headers, _ = await proxy.post("/echo")
                assert (status, headers["X-Payswitch-Gateway"]) == (200, "g2")


async def test_health_checks_verify_the_gateway_as_its_traffic_does(
    pki: Pki, tmp_path: Path
) -> None:
    async with tls_server(pki.server_context(require_client_cert=True)) as (port, handshakes):
        tls = (
            f'{{ca_file: "{pki.path("ca.pem")}", server_name: gw.example, '
            f'client_cert: "{pki.path("client.pem")}", client_key: "{pki.path("client.key")}"}}'
        )
        rules = f"""
            gateways:
              g1: {{url: "https://{HOST}:{port}", region: eu, tls: {tls},
                   health_check: {{path: /echo, interval: 50ms, timeout: 40ms,
                                  healthy_threshold: 1, unhealthy_threshold: 1}}}}
            routes:
              - {{name: r, match: {{path_prefix: /}}, region: {{default: eu}}, gateways: [g1]}}
        """
        async with running_proxy(rules, tmp_path) as proxy:
            st = proxy.rt.states["g1"]
            await eventually(lambda: len(handshakes) >= 1)
            await asyncio.sleep(0.3)  # six probes: one failure would have flagged it
            assert not st.flags & Flag.ACTIVE_FAILED
            assert set(handshakes) == {"gw.example"}


# -- the same on uvloop, the loop payswitch serves on ---------------------------------------


def test_on_uvloop(pki: Pki) -> None:
    async def scenarios() -> None:
        await test_verified_and_pooled_one_handshake(pki)
        await test_a_certificate_that_does_not_verify_is_a_connect_failure(
            pki, "{ca_file: other-ca.pem}", "CERTIFICATE_VERIFY_FAILED"
        )
        await test_mutual_tls(pki)
        await test_a_client_certificate_refused_is_a_connect_failure(pki, "TLSv1_3")

    uvloop.run(scenarios())
