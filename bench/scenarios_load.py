"""Steady payment load for the failover scenarios, and what the clients saw.

Owns: an open-loop POST generator (a fixed rate for a fixed time, each request with its
own Idempotency-Key, whatever the proxy's latency) and `Sample`, one request as the client
saw it.
Must not: send anywhere but the loopback URL it is given, or run unbounded: the request
count is rate x duration and each request has a client-side deadline.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

import aiohttp

from proxy.aio import spawn

logger = logging.getLogger(__name__)

BODY = b'{"amount": 100, "currency": "EUR", "method": "card"}'


@dataclass(frozen=True, slots=True)
class Sample:
    t: float  # seconds into the scenario when the request was sent
    latency: float
    status: int  # 0: no HTTP answer at all (client-side deadline or connection error)
    gateway: str | None
    key: str
    attempts: int
    unknown: bool = False  # payswitch answered "outcome unknown": sent, outcome lost

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


async def _one(session: aiohttp.ClientSession, url: str, t0: float, deadline: float) -> Sample:
    key = uuid.uuid4().hex
    started = time.monotonic()
    status, gateway, attempts, unknown = 0, None, 0, False
    try:
        async with session.post(
            url,
            data=BODY,
            headers={"Idempotency-Key": key, "Content-Type": "application/json"},
            timeout=aiohttp.ClientTimeout(total=deadline),
        ) as resp:
            body = await resp.read()
            status = resp.status
            unknown = status >= 500 and b"outcome-unknown" in body
            gateway = resp.headers.get("X-Payswitch-Gateway")
            attempts = int(resp.headers.get("X-Payswitch-Attempts", "0") or 0)
    except (TimeoutError, aiohttp.ClientError) as exc:
        logger.debug("request failed on the client side: %r", exc)
    return Sample(started - t0, time.monotonic() - started, status, gateway, key, attempts, unknown)


async def drive(
    url: str, *, rate: float, duration: float, t0: float, deadline: float
) -> list[Sample]:
    """POST to `url` at `rate` per second for `duration` seconds from `t0` (monotonic)."""
    count = int(rate * duration)
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        tasks: list[asyncio.Task[Sample]] = []
        for i in range(count):
            pause = t0 + i / rate - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)
            tasks.append(spawn(_one(session, url, t0, deadline), name=f"scenario-request-{i}"))
        return list(await asyncio.gather(*tasks))
