"""One request's cycle on its connection: the handler's answer, framed and written.

Owns: running the handler (a crash is a 500), deciding once, before the first byte,
whether the connection carries another request, and writing the answer whole in one
write, or streamed with Content-Length, chunked or close-delimited framing while
respecting the client's read pace.
Must not: parse requests or choose what runs next (the connection does), or cancel a
handler whose client went away.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from proxy.aio import spawn
from proxy.http import Answer, ClientClosed, Request, problem
from proxy.server import wire

if TYPE_CHECKING:
    from proxy.server.connection import Connection

logger = logging.getLogger("proxy.server")

#: Answers that never carry a body.
_BODILESS_STATUS = frozenset({204, 304})


async def serve(conn: Connection, req: Request) -> None:
    """Run the handler for `req` and write its answer; the connection then goes on, and
    the answer's bookkeeping (`Answer.then`) runs after the answer has gone out."""
    then: Callable[[], Awaitable[None]] | None = None
    try:
        try:
            answer = await conn.server.handler(req)
        except Exception:
            logger.exception("request handler failed for %s %s", req.method, req.raw_path)
            answer = problem(
                500, "Internal proxy error", "the proxy failed this request", "internal"
            )
        then = answer.then
        try:
            await write(conn, req, answer)
        except Exception:
            logger.exception("writing the answer to %s %s failed", req.method, req.raw_path)
            conn.abort()
    except BaseException:
        # Cancelled with no answer written: the client must not read the next
        # request's answer as this one's.
        conn.abort()
        if then is not None:
            # Cancelled mid-answer: the payment is still recorded, in a task of its own.
            spawn(_keep_books(then, req), name="bookkeeping")
        raise
    finally:
        conn.finished(req)
    # Not in a `finally`: an await there leaks the handled exception into later ones
    # in the compiled build.
    if then is not None:
        await _keep_books(then, req)


async def _keep_books(then: Callable[[], Awaitable[None]], req: Request) -> None:
    try:
        await then()
    except Exception:
        logger.exception("bookkeeping failed for %s %s", req.method, req.raw_path)


def keep(conn: Connection, req: Request) -> bool:
    """May this connection carry another request after `req`? Not once the listener
    drains: the answer then says Connection: close, so the client reconnects elsewhere."""
    return (
        req.keep_alive
        and req.complete
        and not req.over_cap
        and req.error is None
        # `winding_down`, written out: twice per request
        and not (conn.server.draining or conn.server.closing)
    )


async def write(conn: Connection, req: Request, answer: Answer) -> None:
    stream = answer.stream
    transport = conn.transport
    if transport is None or conn.aborted:
        if stream is not None:
            stream.release()
        return  # the client left; the handler has accounted the request already
    status = answer.status
    # Decided once, before the first byte: the connection ends after this answer when
    # the request says so, or nothing more will be read and nothing more waits.
    close = conn.last_answer = not keep(conn, req) or (
        not conn.reading and not conn.waiting and conn.refusal is None
    )
    bodiless = req.method == "HEAD" or status in _BODILESS_STATUS or status < 200
    keep10 = not close and not req.http11  # an HTTP/1.0 client asked for keep-alive
    if stream is None:
        body = answer.body
        head = wire.head(status, answer.headers, None if bodiless else len(body), close, keep10)
        transport.write(head if bodiless or not body else head + body)
        return
    try:
        if bodiless:
            transport.write(wire.head(status, answer.headers, None, close, keep10))
            return
        length = answer.length
        chunked = length is None and req.http11
        if length is None and not chunked:
            # HTTP/1.0 and no length: the body ends when the connection does.
            close = conn.last_answer = True
            keep10 = False
        transport.write(wire.head(status, answer.headers, length, close, keep10, chunked))
        await _stream(conn, answer, length, chunked)
    except ClientClosed:
        logger.debug("client left mid-answer to %s %s", req.method, req.raw_path)
    except Exception as exc:
        # A gateway dying mid-body: cut the client off (with a reset, so even a
        # close-delimited body cannot pass for complete).
        logger.warning("response stream from gateway cut off: %r", exc)
        conn.abort()
    finally:
        stream.release()


async def _stream(conn: Connection, answer: Answer, length: int | None, chunked: bool) -> None:
    """The body after the head: what the handler had, then the stream, checked against
    the length the head announced."""
    assert answer.stream is not None
    sent = 0
    if answer.body:
        sent += await _send(conn, answer.body, chunked)
    async for chunk in answer.stream.iter_any():
        if not chunk:
            continue  # an empty chunk would end a chunked body early
        if length is not None and sent + len(chunk) > length:
            raise ValueError(f"the gateway sent more than its {length}-byte body")
        sent += await _send(conn, chunk, chunked)
    if length is not None and sent != length:
        raise ValueError(f"the gateway's body ended at {sent} of {length} bytes")
    if chunked and conn.transport is not None:
        conn.transport.write(b"0\r\n\r\n")


async def _send(conn: Connection, data: bytes, chunked: bool) -> int:
    transport = conn.transport
    if transport is None or conn.aborted:
        raise ClientClosed("the client closed the connection mid-answer")
    if chunked:
        transport.write(b"%x\r\n%b\r\n" % (len(data), data))
    else:
        transport.write(data)
    if conn.write_paused:
        conn.drain = conn.loop.create_future()
        try:
            await conn.drain
        finally:
            conn.drain = None
    return len(data)
