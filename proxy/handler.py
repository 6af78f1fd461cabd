"""The data plane: one client request in, one response out.

Owns: reading the (capped) body, matching a route on the snapshot the request started
with, running the retry loop, writing the gateway's answer or a problem body back, and the
per-request bookkeeping (metrics, access log, transaction events and record). A forwarded
answer's bookkeeping is its `Answer.then`, run by the listener once the answer is written:
the client never waits on it. The idempotency key is settled before: a retry must find
what this request was told.
Must not: choose gateways or judge attempts (retry, balancer) or parse rules (config).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import TYPE_CHECKING

from multidict import CIMultiDict

from proxy import errors
from proxy.accesslog import AccessLog, AccessRecord
from proxy.aio import spawn
from proxy.attempt import Attempt, Settled
from proxy.clock import monotonic, wall_time
from proxy.config.model import IDEMPOTENT_METHODS, TransactionHeaders
from proxy.events import Severity
from proxy.headers import HeaderPolicy, response_headers, upstream_headers
from proxy.http import Answer, BodyOverCap, BodyTimeout, ClientClosed, MalformedBody, Request
from proxy.ids import new_id
from proxy.kafka.commands import Command
from proxy.kafka.plane import check_route
from proxy.ledger import PaymentsLedger
from proxy.metrics import Metrics
from proxy.outbound import AttemptEnded, NoteAttempt, Outbound
from proxy.payments import Payments, Ticket
from proxy.retry import Dispatch
from proxy.routing import RoutePlan, Router
from proxy.upstream.state import Outcome

if TYPE_CHECKING:
    from proxy.app import Runtime
    from proxy.config.store import Snapshot

logger = logging.getLogger(__name__)


class ProxyHandler:
    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        # Built on the loop that serves it. Kept: on Python 3.11 each
        # `asyncio.get_running_loop()` is a getpid system call.
        self.loop = asyncio.get_running_loop()
        # The parts of the runtime every request uses, made once and never replaced, held
        # here: reading them through the runtime (a Python object) is a dictionary lookup
        # each. `rt.parts` is not among them: swapping the tracer replaces it.
        self.payments: Payments = rt.payments
        self.metrics: Metrics = rt.metrics
        self.access_log: AccessLog | None = rt.access_log
        self.disabled_routes: dict[str, Command] = rt.disabled_routes
        self.header_policy: HeaderPolicy = rt.header_policy
        self.ledger: PaymentsLedger = rt.ledger
        self.idle_flush: tuple[Callable[[], None], ...] = rt.idle_flush
        # The router of the rules serving now, replaced in the same step as the store's
        # snapshot (its swap listeners run before anything else can): a request reads it
        # once and keeps it, as it kept the snapshot.
        self.router: Router = rt.store.current.compiled
        rt.store.add_listener(self._swapped)

    def _swapped(self, new: Snapshot[Router], old: Snapshot[Router] | None) -> None:
        self.router = new.compiled

    def body_cap(self) -> int:
        """The largest request body any route of the current rules accepts."""
        return self.router.max_body

    async def handle(self, request: Request) -> Answer:
        rt = self.rt
        started = monotonic()
        router = self.router
        plan: RoutePlan | None = None
        region: str | None = None
        txn_id: str | None = None
        try:
            plan, body = await _match(request, router)
            headers = request.headers
            if self.disabled_routes:
                check_route(self.disabled_routes, plan.name)
            region = plan.region_for(headers)
            th = router.transaction_headers
            ticket: Ticket | None = None
            if plan.idempotency is not None and request.method not in IDEMPOTENT_METHODS:
                claimed = await self.payments.claim(
                    plan, request.method, request.raw_path, headers, body
                )
                if isinstance(claimed, Answer):
                    self._account(
                        request, plan, region, None, None, claimed.status, started, (), "replayed"
                    )
                    return claimed
                ticket = claimed
            # The transaction id is payswitch's: a client-sent one could overwrite another
            # payment's record; upstream_headers drops every X-Payswitch-* the client sent.
            txn_id = ticket.transaction_id if ticket else new_id()
            req = self._outbound(request, plan, region, body, txn_id, th, ticket, router)
            dispatch = Dispatch(req, rt.parts)
            tracing = rt.parts.tracing
            if tracing is None:
                return await self._dispatch(request, dispatch, ticket, started)
            with tracing.request_span(
                request.method,
                plan.name,
                headers,
                path=request.path,
                region=region,
                transaction_id=txn_id,
            ) as span:
                resp = await self._dispatch(request, dispatch, ticket, started)
                tracing.record_outcome(span, resp.status, dispatch.client_outcome or "unknown")
                if resp.then is not None:
                    resp.then = tracing.within_current(resp.then)
                return resp
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

    def _outbound(
        self,
        request: Request,
        plan: RoutePlan,
        region: str,
        body: bytes,
        txn_id: str,
        th: TransactionHeaders,
        ticket: Ticket | None,
        router: Router,
    ) -> Outbound:
        """The request as the gateways will see it."""
        headers = request.headers
        fwd = upstream_headers(
            headers,
            client_ip=request.remote,
            scheme=request.scheme,
            host=request.host,
            policy=self.header_policy,
            owned=plan.owned_headers,
        )
        fwd[th.transaction_id] = txn_id
        if ticket is not None:
            fwd[ticket.policy.header] = ticket.forward_key
        idem = plan.idempotency
        return Outbound(
            plan=plan,
            region=region,
            method=request.method,
            path_qs=request.raw_path,
            headers=fwd,
            body=body,
            transaction_id=txn_id,
            attempt_header=th.attempt_id,
            transaction_header=th.transaction_id,
            has_key=(idem.header if idem else "Idempotency-Key") in headers,
            forced_gateway=ticket.forced_gateway if ticket else None,
            states=router.states,
            note_attempt=_noter(self.payments, ticket) if ticket is not None else None,
        )

    async def _dispatch(
        self, request: Request, dispatch: Dispatch, ticket: Ticket | None, started: float
    ) -> Answer:
        rt = self.rt
        started_wall = wall_time()
        # On the loop's next turn: by then the request is on its way to the gateway (the
        # first attempt is written in this step), so building the event does not delay it.
        pending = _Pending(self, dispatch, started)
        self.loop.call_soon(pending)
        inflight = self.payments.in_flight
        inflight[dispatch.req.transaction_id] = (dispatch, started_wall)
        try:
            settled = await dispatch.run()
        except BaseException:
            inflight.pop(dispatch.req.transaction_id, None)
            # Cancelled mid-flight: what was sent may still be charged; never free the key.
            if ticket is not None:
                spawn(
                    self.payments.settle(ticket, _interrupted(dispatch), 0, CIMultiDict(), None),
                    name="settle-interrupted",
                )
            raise
        inflight.pop(dispatch.req.transaction_id, None)
        if len(dispatch.attempts) > 1:
            self._count_retries(dispatch)
        status, headers, body, error = self._response_parts(dispatch, settled)
        if isinstance(error, errors.NoGatewayAvailable):
            rt.all_down(
                dispatch.req.plan.name,
                dispatch.req.region,
                [t.outcome for t in error.tried],
                error.tried,
            )
        if ticket is not None:
            # Before the answer: a retry with the same key must find what this one was told.
            await self.payments.settle(ticket, settled, status, headers, body)
        self.ledger.settled(dispatch)
        ended = monotonic()

        async def then() -> None:
            """The payment's record, event, metrics and access log: once it is answered."""
            pending()  # an answer that needed no wait: the pending event still comes first
            state = _state(settled, status)
            self._transaction_event(
                _EVENT_OF_STATE[state], dispatch, settled, status, started, ended
            )
            await self.payments.record(dispatch, state, status, started_wall)
            att = settled.attempt
            self._account(
                request,
                dispatch.req.plan,
                dispatch.req.region,
                dispatch.req.transaction_id,
                att.gateway.name if att and settled.reply else None,
                status,
                started,
                error.tried if error is not None else settled.tried,
                error.slug if error is not None else None,
                ended,
            )
            if not inflight:
                # Nothing else waits on a gateway: write the batched output now, between
                # requests, rather than when a linger timer lands in the middle of one.
                for flush in self.idle_flush:
                    flush()

        reply = settled.reply
        if reply is not None and reply.stream is not None:
            # A large answer goes on as it arrives; the server releases the upstream.
            stream, reply.stream = reply.stream, None
            return Answer(
                status,
                headers,
                body or b"",
                stream=stream,
                length=stream.content_length,
                then=then,
            )
        return Answer(status, headers, body or b"", then=then)

    def _count_retries(self, dispatch: Dispatch) -> None:
        """Each attempt after the first, by why the one before it was left."""
        why = {t.attempt_id: t.outcome for t in dispatch.tried if t.attempt_id}
        for prev in dispatch.attempts[:-1]:
            self.metrics.retry(dispatch.req.plan.name, why.get(prev.attempt_id, "answered"))

    def _response_parts(
        self, dispatch: Dispatch, settled: Settled
    ) -> tuple[int, CIMultiDict[str], bytes | None, errors.ProxyError | None]:
        txn_header = dispatch.req.transaction_header
        reply, att = settled.reply, settled.attempt
        if reply is None or att is None:
            err = settled.error or errors.UpstreamFailed("no answer", route=dispatch.req.plan.name)
            err.route = err.route or dispatch.req.plan.name
            err.region = err.region or dispatch.req.region
            headers: CIMultiDict[str] = CIMultiDict(err.headers)
            headers["Content-Type"] = "application/problem+json"
            headers[txn_header] = dispatch.req.transaction_id
            headers["X-Payswitch-Attempts"] = str(len(settled.attempts))
            return err.status, headers, errors.problem_body(err, dispatch.req.transaction_id), err
        headers = response_headers(reply.headers)
        headers["X-Payswitch-Gateway"] = att.gateway.name
        headers["X-Payswitch-Attempts"] = str(len(settled.attempts))
        headers[txn_header] = dispatch.req.transaction_id
        return reply.status, headers, reply.body, None

    def _transaction_event(
        self,
        kind: str,
        dispatch: Dispatch,
        settled: Settled | None,
        status: int | None,
        started: float,
        ended: float | None = None,
    ) -> None:
        att = None
        if settled is not None:
            att = settled.attempt or (settled.attempts[-1] if settled.attempts else None)
        self.rt.events.emit(
            kind,
            _SEVERITY_OF_EVENT[kind],
            transaction_id=dispatch.req.transaction_id,
            route=dispatch.req.plan.name,
            region=dispatch.req.region,
            gateway=att.gateway.name if att else None,
            attempt_id=att.attempt_id if att else None,
            attempts=len(settled.attempts) if settled else 0,
            status=status,
            duration_ms=_millis((ended or monotonic()) - started),
        )

    def _account(
        self,
        request: Request,
        plan: RoutePlan | None,
        region: str | None,
        txn_id: str | None,
        gateway: str | None,
        status: int,
        started: float,
        tried: tuple[errors.Tried, ...] | list[errors.Tried],
        error: str | None,
        ended: float | None = None,
    ) -> None:
        elapsed = (ended or monotonic()) - started
        route = plan.name if plan is not None else "-"
        outcome = error or _STATUS_CLASS.get(status // 100) or f"{status // 100}xx"
        self.metrics.request(route, gateway or "-", outcome, elapsed)
        access_log = self.access_log
        if access_log is not None:
            access_log.request(
                # `tuple.__new__`: a named tuple's own `__new__` runs interpreted.
                tuple.__new__(
                    AccessRecord,
                    (
                        wall_time(),
                        request.method,
                        request.path,
                        status,
                        route,
                        region,
                        gateway,
                        txn_id,
                        tuple(tried),
                        error,
                        _millis(elapsed),
                        request.remote,
                        None,
                    ),
                )
            )


class _Pending:
    """A dispatch's `transaction.pending` event, emitted once: whichever comes first of the
    loop's next turn and the event of its outcome."""

    __slots__ = ("dispatch", "handler", "started")

    def __init__(self, handler: ProxyHandler, dispatch: Dispatch, started: float) -> None:
        self.handler: ProxyHandler | None = handler
        self.dispatch = dispatch
        self.started = started

    def __call__(self) -> None:
        handler = self.handler
        if handler is not None:
            self.handler = None
            handler._transaction_event(
                "transaction.pending", self.dispatch, None, None, self.started
            )


async def _match(request: Request, router: Router) -> tuple[RoutePlan, bytes]:
    """The route a request takes and its whole body; ProxyError when it cannot be routed."""
    if not request.raw_path.startswith("/"):
        raise errors.BadRequest("request target must be an absolute path")
    method, path, headers = request.method, request.path, request.headers
    if "/." in path and _DOT_SEGMENT.search(path):
        # Matched as one path, resolved as another by the gateway: never routed.
        raise errors.BadRequest("request path must not contain . or .. segments")
    body = await _read_body(request, router, method, path)
    plan = (
        router.match(method, path, headers, body)
        if router.needs_body
        else router.match_without_body(method, path, headers)
    )
    if plan is None:
        raise errors.NoRoute(f"no route matches {method} {path}")
    if len(body) > plan.max_body:
        raise errors.BodyTooLarge(
            f"request body is {len(body)} bytes; route {plan.name} accepts at most {plan.max_body}",
            route=plan.name,
        )
    return plan, body


def _millis(seconds: float) -> float:
    """`seconds` in milliseconds to the microsecond. `round(x, 3)` would do, but a float's
    round to some digits goes through a decimal string; three are rounded per request."""
    return int(seconds * 1_000_000 + 0.5) / 1000


def attempt_metric(metrics: Metrics) -> AttemptEnded:
    """Counts every attempt's end by route, gateway and outcome."""

    def record(dispatch: Dispatch, att: Attempt, outcome: Outcome, seconds: float) -> None:
        # `_value_`, not `.value`: the enum's property runs interpreted, once per attempt.
        metrics.attempt(dispatch.req.plan.name, att.gateway.name, outcome._value_, seconds)

    return record


def _noter(payments: Payments, ticket: Ticket) -> NoteAttempt:
    async def note(gateway: str, attempt_id: str) -> bool:
        return await payments.note_attempt(ticket, gateway, attempt_id)

    return note


_DOT_SEGMENT = re.compile(r"/\.\.?(?:/|$)")

_EVENT_OF_STATE = {
    "SUCCESS": "transaction.succeeded",
    "FAILURE": "transaction.failed",
    "UNKNOWN": "transaction.unknown",
}
#: Severity of each transaction event: an unknown outcome is what someone must look at.
_SEVERITY_OF_EVENT = {
    "transaction.pending": Severity.INFO,
    "transaction.succeeded": Severity.INFO,
    "transaction.failed": Severity.INFO,
    "transaction.unknown": Severity.WARNING,
}
#: "1xx" .. "5xx" by status // 100: a lookup, not a format, on every request.
_STATUS_CLASS = {n: f"{n}xx" for n in range(1, 6)}


def _state(settled: Settled, status: int) -> str:
    if settled.unknown:
        return "UNKNOWN"
    if settled.reply is not None and status < 400:
        return "SUCCESS"
    if settled.reply is not None and status >= 500:
        # The gateway's own 5xx: it may or may not have processed the payment.
        return "UNKNOWN" if any(not a.did_nothing for a in settled.attempts) else "FAILURE"
    return "FAILURE"


def _interrupted(dispatch: Dispatch) -> Settled:
    return Settled(
        reply=None, attempt=None, attempts=dispatch.attempts, tried=dispatch.tried, unknown=True
    )


async def _read_body(request: Request, router: Router, method: str, path: str) -> bytes:
    """The whole request body, refusing more than any route could accept."""
    cap = router.max_body
    length = request.content_length
    if length is not None and length > cap:
        plan = router.match_without_body(method, path, request.headers)
        raise errors.BodyTooLarge(
            f"request body is {length} bytes; at most {plan.max_body if plan else cap} accepted",
            route=plan.name if plan else None,
        )
    try:
        return await request.read(cap)
    except BodyOverCap:
        raise errors.BodyTooLarge(f"request body exceeds {cap} bytes") from None
    except MalformedBody as malformed:
        raise errors.BadRequest(f"malformed request body: {malformed}") from None
    except BodyTimeout as late:
        raise errors.RequestTimeout(str(late)) from None
    except ClientClosed as gone:
        raise errors.ClientClosed(str(gone)) from None
