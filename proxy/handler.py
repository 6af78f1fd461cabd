"""The data plane: one client request in, one response out.

Owns: reading the (capped) body, matching a route on the snapshot the request started
with, running the retry loop, writing the gateway's answer or a problem body back, and the
per-request bookkeeping (metrics, access log, transaction events).
Must not: choose gateways or judge attempts (retry, balancer) or parse rules (config).
"""

from __future__ import annotations

import logging
import time
import uuid
from typing import TYPE_CHECKING

from aiohttp import web
from multidict import CIMultiDict

from proxy import errors
from proxy.events import Severity
from proxy.forward import AttemptFailed, Reply, response_headers, upstream_headers
from proxy.retry import Attempt, Dispatch, Settled
from proxy.routing import RoutePlan, Router

if TYPE_CHECKING:
    from proxy.app import Runtime

logger = logging.getLogger(__name__)


class ProxyHandler:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    async def handle(self, request: web.Request) -> web.StreamResponse:
        rt = self.rt
        started = time.monotonic()
        snapshot = rt.store.current
        router: Router = snapshot.compiled
        plan: RoutePlan | None = None
        region: str | None = None
        txn_id: str | None = None
        try:
            raw_path = request.raw_path
            if not raw_path.startswith("/"):
                raise errors.BadRequest("request target must be an absolute path")
            method = request.method
            path = request.path
            headers = request.headers
            body = await _read_body(request, router, method, path)
            plan = (
                router.match(method, path, headers, body)
                if router.needs_body
                else router.match_without_body(method, path, headers)
            )
            if plan is None:
                raise errors.NoRoute(f"no route matches {method} {path}")
            if len(body) > plan.route.max_body:
                raise errors.BodyTooLarge(
                    f"request body is {len(body)} bytes; route {plan.name} accepts at most {plan.route.max_body}",
                    route=plan.name,
                )
            region = plan.region_for(headers)
            th = snapshot.rules.transaction_headers
            txn_id = headers.get(th.transaction_id) or uuid.uuid4().hex
            fwd = upstream_headers(
                headers, client_ip=request.remote, scheme=request.scheme, host=request.host
            )
            fwd[th.transaction_id] = txn_id
            dispatch = Dispatch(
                plan=plan,
                region=region,
                method=method,
                path_qs=raw_path,
                headers=fwd,
                body=body,
                transaction_id=txn_id,
                balancer=rt.balancer,
                health=rt.health,
                forwarder=rt.forwarder,
                clock=rt.clock,
                attempt_header=th.attempt_id,
                on_late=rt.late_result,
                on_attempt=self._attempt_metric(plan.name),
            )
            rt.events.emit(
                "transaction.pending",
                Severity.INFO,
                transaction_id=txn_id,
                route=plan.name,
                region=region,
                gateway=None,
                attempt_id=None,
                attempts=0,
                status=None,
                duration_ms=0.0,
            )
            settled = await dispatch.run()
            return await self._respond(request, dispatch, settled, started)
        except errors.ProxyError as err:
            if err.route is None and plan is not None:
                err.route = plan.name
            if err.region is None:
                err.region = region
            resp = errors.problem_response(err, txn_id)
            self._account(
                request, plan, region, txn_id, None, resp.status, started, err.tried, err.slug
            )
            return resp

    def _attempt_metric(self, route: str):  # type: ignore[no-untyped-def]
        metrics = self.rt.metrics

        def record(att: Attempt, outcome: str, seconds: float) -> None:
            metrics.attempt(route, att.gateway.name, outcome, seconds)

        return record

    async def _respond(
        self, request: web.Request, dispatch: Dispatch, settled: Settled, started: float
    ) -> web.StreamResponse:
        rt = self.rt
        plan = dispatch.plan
        txn_header = rt.store.current.rules.transaction_headers.transaction_id
        if settled.reply is None or settled.attempt is None:
            err = settled.error or errors.UpstreamFailed("no answer", route=plan.name)
            err.route = err.route or plan.name
            err.region = err.region or dispatch.region
            resp = errors.problem_response(err, dispatch.transaction_id)
            resp.headers[txn_header] = dispatch.transaction_id
            resp.headers["X-Payswitch-Attempts"] = str(len(settled.attempts))
            self._transaction_end(dispatch, settled, resp.status, started)
            self._account(
                request,
                plan,
                dispatch.region,
                dispatch.transaction_id,
                None,
                resp.status,
                started,
                err.tried,
                err.slug,
            )
            return resp
        reply, att = settled.reply, settled.attempt
        headers = response_headers(reply.headers)
        headers["X-Payswitch-Gateway"] = att.gateway.name
        headers["X-Payswitch-Attempts"] = str(len(settled.attempts))
        headers[txn_header] = dispatch.transaction_id
        self._transaction_end(dispatch, settled, reply.status, started)
        self._account(
            request,
            plan,
            dispatch.region,
            dispatch.transaction_id,
            att.gateway.name,
            reply.status,
            started,
            settled.tried,
            None,
        )
        if reply.stream is None:
            return web.Response(status=reply.status, headers=headers, body=reply.body)
        return await _stream(request, reply, headers)

    def _transaction_end(
        self, dispatch: Dispatch, settled: Settled, status: int, started: float
    ) -> None:
        if settled.unknown:
            kind = "transaction.unknown"
        elif settled.reply is not None and settled.reply.status < 400:
            kind = "transaction.succeeded"
        else:
            kind = "transaction.failed"
        att = settled.attempt or (settled.attempts[-1] if settled.attempts else None)
        self.rt.events.emit(
            kind,
            Severity.WARNING if kind == "transaction.unknown" else Severity.INFO,
            transaction_id=dispatch.transaction_id,
            route=dispatch.plan.name,
            region=dispatch.region,
            gateway=att.gateway.name if att else None,
            attempt_id=att.attempt_id if att else None,
            attempts=len(settled.attempts),
            status=status,
            duration_ms=round((time.monotonic() - started) * 1000, 3),
        )

    def _account(
        self,
        request: web.Request,
        plan: RoutePlan | None,
        region: str | None,
        txn_id: str | None,
        gateway: str | None,
        status: int,
        started: float,
        tried: tuple[errors.Tried, ...] | list[errors.Tried],
        error: str | None,
    ) -> None:
        rt = self.rt
        elapsed = time.monotonic() - started
        route = plan.name if plan is not None else "-"
        outcome = error or f"{status // 100}xx"
        rt.metrics.request(route, gateway or "-", outcome, elapsed)
        if rt.access_log is not None:
            rt.access_log.log(
                {
                    "log": "access",
                    "ts": round(time.time(), 3),
                    "method": request.method,
                    "path": request.path,
                    "status": status,
                    "route": route,
                    "region": region,
                    "gateway": gateway,
                    "transaction_id": txn_id,
                    "tried": [{"gateway": t.gateway, "outcome": t.outcome} for t in tried],
                    "error": error,
                    "duration_ms": round(elapsed * 1000, 3),
                    "client": request.remote,
                }
            )


async def _read_body(request: web.Request, router: Router, method: str, path: str) -> bytes:
    """The whole request body, refusing more than any route could accept."""
    cap = router.max_body
    length = request.content_length
    if length is not None:
        if length > cap:
            plan = router.match_without_body(method, path, request.headers)
            raise errors.BodyTooLarge(
                f"request body is {length} bytes; at most {plan.route.max_body if plan else cap} accepted",
                route=plan.name if plan else None,
            )
        if length == 0:
            return b""
        return await request.content.readexactly(length)
    if not request.body_exists:
        return b""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > cap:
            raise errors.BodyTooLarge(f"request body exceeds {cap} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _stream(
    request: web.Request, reply: Reply, headers: CIMultiDict[str]
) -> web.StreamResponse:
    """Send a large answer as it arrives; a gateway dying mid-body aborts the connection
    rather than pass off a truncated body as complete."""
    upstream = reply.stream
    assert upstream is not None
    resp = web.StreamResponse(status=reply.status, headers=headers)
    if upstream.content_length is not None:
        resp.content_length = upstream.content_length
    await resp.prepare(request)
    try:
        if reply.body:
            await resp.write(reply.body)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
    except (OSError, AttemptFailed, Exception) as exc:
        logger.warning("response stream from gateway cut off: %r", exc)
        if request.transport is not None:
            request.transport.abort()
    finally:
        upstream.release()
    return resp
