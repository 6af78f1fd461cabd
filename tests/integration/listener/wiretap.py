"""Feeding raw bytes to the listener and to h11, and what each made of them.

Shared by the differential test and the fuzz target: both compare or bound what a real
payswitch listener on a loopback socket does with a byte stream.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import h11

from proxy.server import MAX_HEAD_BYTES, Answer, BodyError, ProxyServer, Request

HOST = "127.0.0.1"
BODY_CAP = 64 * 1024

Parsed = tuple[bytes, bytes, tuple[tuple[bytes, bytes], ...], bytes]


@dataclass
class Outcome:
    """The requests parsed whole, in order, and whether the stream was refused."""

    requests: list[Parsed] = field(default_factory=list)
    refused: bool = False

    def __str__(self) -> str:
        lines = [f"refused={self.refused}"]
        lines += [f"  {m!r} {t!r} {list(h)} body={b!r}" for m, t, h, b in self.requests]
        return "\n".join(lines)


class Recorder:
    """A handler that records each request it could read whole."""

    def __init__(self) -> None:
        self.parsed: list[Parsed] = []
        self.body_errors = 0

    async def __call__(self, req: Request) -> Answer:
        try:
            body = await req.read(BODY_CAP)
        except BodyError as exc:
            self.body_errors += 1
            return Answer(400, {"X-Body-Error": type(exc).__name__}, b"")
        headers = tuple(
            (name.lower().encode("latin-1"), value.encode("utf-8", "surrogateescape"))
            for name, value in req.headers.items()
        )
        target = req.raw_path.encode("utf-8", "surrogateescape")
        self.parsed.append((req.method.encode(), target, headers, body))
        return Answer(200, {"Content-Type": "text/plain"}, b"ok")


@contextlib.asynccontextmanager
async def listener(**kw: float) -> AsyncIterator[tuple[ProxyServer, Recorder]]:
    recorder = Recorder()
    server = ProxyServer(recorder, lambda: BODY_CAP, **kw)
    await server.start(HOST, 0)
    try:
        yield server, recorder
    finally:
        await server.close(1.0)


async def exchange(server: ProxyServer, raw: bytes, within: float = 5.0) -> bytes:
    """Send `raw`, half-close, and return every byte the listener sent until it closed.
    Raises TimeoutError if the listener neither answers nor closes within `within`."""
    reader, writer = await asyncio.open_connection(HOST, server.port)
    try:
        with contextlib.suppress(ConnectionError):
            writer.write(raw)
            await writer.drain()
            writer.write_eof()
        received = b""
        async with asyncio.timeout(within):
            while True:
                try:
                    piece = await reader.read(65536)
                except ConnectionError:
                    break
                if not piece:
                    break
                received += piece
        return received
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def payswitch_outcome(raw: bytes) -> Outcome:
    async with listener() as (server, recorder):
        received = await exchange(server, raw)
        refused = b"application/problem+json" in received or recorder.body_errors > 0
        return Outcome(list(recorder.parsed), refused)


def h11_outcome(raw: bytes) -> Outcome:
    """What h11, as a server, makes of `raw` followed by the client's half-close."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
    outcome = Outcome()
    conn.receive_data(raw)
    conn.receive_data(b"")
    head: h11.Request | None = None
    body = b""
    try:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                break
            if isinstance(event, h11.ConnectionClosed):
                break
            if isinstance(event, h11.Request):
                head, body = event, b""
            elif isinstance(event, h11.Data):
                body += bytes(event.data)
            elif isinstance(event, h11.EndOfMessage) and head is not None:
                headers = tuple((bytes(n), bytes(v)) for n, v in head.headers)
                outcome.requests.append((bytes(head.method), bytes(head.target), headers, body))
                if head.method == b"CONNECT":
                    break  # a tunnel from here on: payswitch answers and closes instead
                if conn.their_state is h11.MUST_CLOSE or conn.our_state is h11.MUST_CLOSE:
                    break
                conn.send(h11.Response(status_code=200, headers=[("Content-Length", "0")]))
                conn.send(h11.EndOfMessage())
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
                head = None
    except h11.RemoteProtocolError:
        outcome.refused = True
    return outcome
