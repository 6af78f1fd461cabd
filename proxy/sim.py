"""Simulated payment gateways with scripted behaviour, for `make run`, tests and scenarios.

Owns: `FakeGateway`, a real aiohttp server on loopback that can be healthy, slow, hang,
answer an error status or 429, reset the connection, die mid-body, speak garbage or refuse
connections; and `Ledger`, which records every charge and dedupes by Idempotency-Key per
provider, as real providers do — so a test can count payments charged twice.
Must not: listen anywhere but loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal
from urllib.parse import urlsplit

import orjson
from aiohttp import web

logger = logging.getLogger(__name__)

Mode = Literal["ok", "hang", "status", "throttle", "reset", "midbody", "garbage", "down"]
_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True, slots=True, kw_only=True)
class Behaviour:
    mode: Mode = "ok"
    delay: float = 0.0  # seconds before answering (ok, status, throttle)
    status: int = 503  # for mode=status
    retry_after: int = 5  # for mode=throttle
    charge: bool = True  # hang/reset/midbody: take the payment before misbehaving


@dataclass(slots=True)
class Charge:
    gateway: str
    provider: str
    key: str | None
    transaction_id: str | None
    attempt_id: str | None
    at: float


@dataclass(slots=True)
class Ledger:
    """Every payment taken, across all simulated gateways sharing this ledger."""

    charges: list[Charge] = field(default_factory=list)
    _by_key: dict[tuple[str, str], Charge] = field(default_factory=dict)

    def charge(self, gw: FakeGateway, request: web.Request) -> tuple[Charge, bool]:
        """(the charge, whether it is new). A key already seen by this provider is not
        charged again: that is what a provider's idempotency does."""
        key = request.headers.get("Idempotency-Key")
        if key is not None:
            seen = self._by_key.get((gw.provider, key))
            if seen is not None:
                return seen, False
        c = Charge(
            gateway=gw.name,
            provider=gw.provider,
            key=key,
            transaction_id=request.headers.get("X-Payswitch-Transaction-Id"),
            attempt_id=request.headers.get("X-Payswitch-Attempt-Id"),
            at=time.monotonic(),
        )
        self.charges.append(c)
        if key is not None:
            self._by_key[(gw.provider, key)] = c
        return c, True

    def charged_twice(self) -> int:
        """Logical payments (by transaction id, else key) charged more than once."""
        counts: dict[str, int] = {}
        for c in self.charges:
            ident = c.transaction_id or c.key
            if ident is None:
                continue
            counts[ident] = counts.get(ident, 0) + 1
        return sum(1 for n in counts.values() if n > 1)

    def by_transaction(self, txn: str) -> list[Charge]:
        return [c for c in self.charges if c.transaction_id == txn]


@dataclass(slots=True)
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


class FakeGateway:
    """A real HTTP server on 127.0.0.1 whose behaviour a test or operator scripts."""

    _ids = itertools.count(1)

    def __init__(
        self,
        name: str,
        *,
        provider: str | None = None,
        ledger: Ledger | None = None,
        port: int = 0,
        behaviour: Behaviour | None = None,
        host: str = "127.0.0.1",
    ) -> None:
        if host not in _LOOPBACK:
            raise ValueError(f"simulated gateways only listen on loopback, not {host!r}")
        self.name = name
        self.provider = provider or name
        self.ledger = ledger if ledger is not None else Ledger()
        self.host = host
        self.port = port
        self.behaviour = behaviour or Behaviour()
        self.seen: list[Seen] = []
        self._runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._hanging: set[asyncio.Future[None]] = set()
        self._busy: set[asyncio.BaseTransport] = set()  # connections with a request in hand

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def set(self, **changes: Any) -> None:
        self.behaviour = replace(self.behaviour, **changes)

    def requests(self, path_prefix: str = "/v1") -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(path_prefix)]

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(
            app, access_log=None, handle_signals=False, shutdown_timeout=0.1
        )
        await self._runner.setup()
        await self._listen()

    async def _listen(self) -> None:
        assert self._runner is not None
        self._site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await self._site.start()
        if self.port == 0:
            server = self._site._server
            assert server is not None
            sockets: list[Any] = list(getattr(server, "sockets", None) or [])
            self.port = int(sockets[0].getsockname()[1])

    async def down(self) -> None:
        """Stop listening and drop open connections: like a dead gateway, every new
        connection is refused and pooled ones are reset."""
        self.set(mode="down")
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server if self._runner is not None else None
        for conn in list(server.connections if server is not None else ()):
            if conn.transport is not None:
                conn.transport.abort()

    async def restart(self, pause: float) -> None:
        """Restart as a gateway process does: stop listening, close every connection
        once its request in progress is answered (an idle pooled one at once, with a FIN),
        and listen again after `pause`. A request written on a connection as it closes
        is lost unread."""
        if self._site is not None:
            await self._site.stop()
            self._site = None
        server = self._runner.server if self._runner is not None else None
        for conn in list(server.connections if server is not None else ()):
            if conn.transport is None:
                continue
            if conn.transport in self._busy:
                conn.close()  # once this answer is out
            else:
                conn.transport.close()
        await asyncio.sleep(pause)
        if self._site is None and self._runner is not None:
            await self._listen()

    async def up(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        if self._site is None and self._runner is not None:
            await self._listen()

    async def stop(self) -> None:
        for fut in self._hanging:
            fut.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _hang(self) -> None:
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._hanging.add(fut)
        try:
            await fut
        finally:
            self._hanging.discard(fut)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        transport = request.transport
        if transport is None:
            return await self._respond(request)
        self._busy.add(transport)
        try:
            return await self._respond(request)
        finally:
            self._busy.discard(transport)

    async def _respond(self, request: web.Request) -> web.StreamResponse:
        b = self.behaviour
        body = await request.read()
        health = request.path == "/health"
        if not health:
            self.seen.append(
                Seen(request.method, request.path_qs, dict(request.headers), body, time.monotonic())
            )
        if b.delay:
            await asyncio.sleep(b.delay)
        mode = b.mode
        payment = request.method == "POST" and not health
        if mode == "ok":
            if health:
                return web.json_response({"status": "ok", "gateway": self.name})
            return self._answer(request, payment)
        if mode == "status":
            return web.json_response({"error": "simulated", "gateway": self.name}, status=b.status)
        if mode == "throttle":
            return web.json_response(
                {"error": "rate limited", "gateway": self.name},
                status=429,
                headers={"Retry-After": str(b.retry_after)},
            )
        if payment and b.charge:
            self.ledger.charge(self, request)
        transport = request.transport
        if mode == "hang" or mode == "down" or transport is None:
            await self._hang()
            raise web.HTTPServiceUnavailable()
        if mode == "reset":
            transport.abort()
            await self._hang()
        if mode == "garbage":
            transport.write(b"HTTP/1.1 abc nonsense\r\n\x00\x01\r\n\r\n")
            transport.close()
            await self._hang()
        # midbody: promise a body and die halfway through it.
        resp = web.StreamResponse(status=200, headers={"Content-Type": "application/json"})
        resp.content_length = 4096
        await resp.prepare(request)
        await resp.write(b'{"id": "pay_')
        await asyncio.sleep(0.01)
        transport.abort()
        await self._hang()
        return resp

    def _answer(self, request: web.Request, payment: bool) -> web.Response:
        if not payment:
            return web.json_response(
                {"id": "pay_lookup", "status": "succeeded", "gateway": self.name}
            )
        charge, new = self.ledger.charge(self, request)
        return web.json_response(
            {
                "id": f"pay_{self.name}_{id(charge):x}",
                "status": "succeeded",
                "gateway": self.name,
                "provider": self.provider,
                "replayed": not new,
            }
        )


# -- `payswitch sim`: one simulated gateway per loopback gateway in the rules -------------


async def run_from_rules(paths: Sequence[str], *, control_port: int = 9100) -> int:
    """Start a gateway per loopback URL in the rules and a control API to script them."""
    from proxy.config.load import load_rules

    rules = load_rules(paths)
    ledger = Ledger()
    gateways: dict[str, FakeGateway] = {}
    for gw in rules.gateways.values():
        parts = urlsplit(gw.url)
        if parts.hostname not in _LOOPBACK:
            logger.warning("not simulating %s: %s is not a loopback address", gw.name, gw.url)
            continue
        fake = FakeGateway(
            gw.name, provider=gw.provider, ledger=ledger, port=gw.port, host="127.0.0.1"
        )
        await fake.start()
        gateways[gw.name] = fake
        logger.info("simulated gateway %s (%s) on %s", gw.name, gw.provider, fake.url)
    app = web.Application()

    async def show(_: web.Request) -> web.Response:
        return web.json_response(
            {
                "gateways": {
                    n: {"url": g.url, "behaviour": _describe(g.behaviour)}
                    for n, g in gateways.items()
                },
                "charges": len(ledger.charges),
                "charged_twice": ledger.charged_twice(),
            }
        )

    async def set_mode(request: web.Request) -> web.Response:
        fake = gateways.get(request.match_info["name"])
        if fake is None:
            raise web.HTTPNotFound(text="unknown gateway\n")
        try:
            spec = orjson.loads(await request.read() or b"{}")
            behaviour = Behaviour(**spec)
        except (orjson.JSONDecodeError, TypeError) as exc:
            raise web.HTTPBadRequest(text=f"bad behaviour: {exc}\n") from None
        if behaviour.mode == "down":
            await fake.down()
        else:
            await fake.up(behaviour)
        return web.json_response({"gateway": fake.name, "behaviour": _describe(fake.behaviour)})

    app.router.add_get("/", show)
    app.router.add_post("/gateways/{name}", set_mode)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", control_port).start()
    logger.info("simulator control API on http://127.0.0.1:%d/", control_port)
    try:
        await asyncio.Event().wait()
    finally:
        with contextlib.suppress(Exception):
            await runner.cleanup()
            for fake in gateways.values():
                await fake.stop()
    return 0


def _describe(b: Behaviour) -> dict[str, object]:
    return {
        "mode": b.mode,
        "delay": b.delay,
        "status": b.status,
        "retry_after": b.retry_after,
        "charge": b.charge,
    }
