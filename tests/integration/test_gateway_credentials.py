"""Gateway credentials through a real payswitch: added to every attempt, never shown.

The gateway here is a raw socket server that keeps each request head byte for byte, so a
duplicated header cannot hide behind a parsed mapping.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.support import Proxy, running_proxy

SECRET = "sk_live_first-do-not-show"
ROTATED = "sk_live_second-do-not-show"
ENV_KEY = "PAYSWITCH_TEST_API_KEY"
ENV_VALUE = "key_do-not-show"


class RawGateway:
    """Answers 200 to every request and keeps the request heads it read."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []
        self.port = 0
        self._server: asyncio.Server | None = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
                await writer.drain()
        writer.close()

    def values(self, name: str, head: int = -1) -> list[str]:
        lines = self.heads[head].decode().split("\r\n")[1:]
        wanted = name.lower()
        return [
            v.strip() for n, _, v in (line.partition(":") for line in lines) if n.lower() == wanted
        ]

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[RawGateway]:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        try:
            yield self
        finally:
            self._server.close()
            await self._server.wait_closed()


def rules(port: int, secret_file: Path) -> str:
    return f"""\
gateways:
  stripe-eu:
    url: http://127.0.0.1:{port}
    region: eu
    headers:
      Authorization: {{value_from: {{file: {secret_file}}}}}
      X-Api-Key: {{value_from: {{env: {ENV_KEY}}}}}
routes:
  - name: deposits
    match: {{path_prefix: /v1/deposits}}
    gateways: [stripe-eu]
"""


async def shown_everywhere(p: Proxy) -> str:
    """Everything payswitch shows about itself: admin views, metrics and its events."""
    texts = []
    for path in ("/admin/config", "/admin/gateways", "/metrics"):
        async with p.session.get(p.admin_url + path) as resp:
            texts.append(await resp.text())
    texts += [json.dumps(e.fields, default=str) for e in p.events.events]
    return "\n".join(texts)


async def test_credentials_replace_the_clients_and_follow_a_rotation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv(ENV_KEY, ENV_VALUE)
    secret_file = tmp_path / "stripe-key"
    secret_file.write_text(f"Bearer {SECRET}\n")
    async with RawGateway().running() as gw:
        async with running_proxy(rules(gw.port, secret_file), tmp_path) as p:
            client_headers = {"Authorization": "Bearer client", "x-api-key": "client"}
            status, _, _ = await p.post(headers=client_headers)
            assert status == 200
            assert gw.values("Authorization") == [f"Bearer {SECRET}"]
            assert gw.values("X-Api-Key") == [ENV_VALUE]

            async with p.session.post(p.admin_url + "/admin/reload") as resp:
                assert (await resp.json())["outcome"] == "unchanged"

            secret_file.write_text(f"Bearer {ROTATED}\n")
            async with p.session.post(p.admin_url + "/admin/reload") as resp:
                result = await resp.json()
                assert (resp.status, result["outcome"], result["generation"]) == (
                    200,
                    "success",
                    2,
                )
            assert (await p.post(headers=client_headers))[0] == 200
            assert gw.values("Authorization") == [f"Bearer {ROTATED}"]

            secret_file.unlink()
            async with p.session.post(p.admin_url + "/admin/reload") as resp:
                refused = await resp.json()
                assert resp.status == 422
            [issue] = refused["issues"]
            assert issue["message"] == (
                f"header `Authorization`: cannot read {secret_file}: No such file or directory"
            )
            assert (await p.post())[0] == 200  # the rules that read the rotated value serve on
            assert gw.values("Authorization") == [f"Bearer {ROTATED}"]

            shown = await shown_everywhere(p) + caplog.text
            for value in (SECRET, ROTATED, ENV_VALUE):
                assert value not in shown
            assert str(secret_file) in shown  # where it comes from is not secret
