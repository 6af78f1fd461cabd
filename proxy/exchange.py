"""Starting one attempt's exchange with its gateway, traced when tracing is on.

Owns: the attempt's own copy of the request headers (its attempt id, the trace context),
the one call into the forwarder, its attempt span, and turning a crash while starting into
a loud, ambiguous failure.
Must not: time the attempt (proxy.retry owns the per-try timer; the forwarder is only
given the bound on an abandoned attempt), judge its outcome, or retry.
"""

from __future__ import annotations

import asyncio
import logging

from multidict import CIMultiDict

from proxy.aio import spawn_owned
from proxy.attempt import Attempt, Result
from proxy.forward import AttemptFailed
from proxy.outbound import Outbound, Parts
from proxy.tracing import Tracing
from proxy.upstream.state import Outcome

logger = logging.getLogger(__name__)


def start_exchange(
    att: Attempt, req: Outbound, parts: Parts, number: int
) -> asyncio.Future[Result]:
    """The attempt's exchange, running; `number` counts attempts of the request from 1."""
    headers = req.headers.copy()
    headers[req.attempt_header] = att.attempt_id
    tracing = parts.tracing
    if tracing is not None:
        return spawn_owned(
            _traced(att, req, parts, headers, tracing, number),
            name=f"attempt:{att.gateway.name}:{att.attempt_id}",
        )
    return _send(att, req, parts, headers)


def _send(
    att: Attempt, req: Outbound, parts: Parts, headers: CIMultiDict[str]
) -> asyncio.Future[Result]:
    timeouts = req.plan.route.timeouts
    try:
        return parts.forwarder.start(
            att.gateway,
            req.method,
            req.path_qs,
            headers,
            req.body,
            connect_timeout=timeouts.connect,
            within=max(timeouts.abandoned, timeouts.per_try),
            progress=att.progress,
        )
    except Exception as exc:  # a bug, not a gateway failure: ambiguous, and loud
        logger.exception("attempt %s crashed", att.attempt_id)
        failed: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
        failed.set_result(
            AttemptFailed(Outcome.BAD_RESPONSE, f"internal error: {exc!r}", sent=True)
        )
        return failed


async def _traced(
    att: Attempt,
    req: Outbound,
    parts: Parts,
    headers: CIMultiDict[str],
    tracing: Tracing,
    number: int,
) -> Result:
    with tracing.attempt_span(
        att.gateway,
        route=req.plan.name,
        region=req.region,
        method=req.method,
        path_qs=req.path_qs,
        attempt_id=att.attempt_id,
        attempt_no=number,
        transaction_id=req.transaction_id,
    ) as span:
        tracing.inject(headers)
        exchange = _send(att, req, parts, headers)
        try:
            result = await exchange
        except asyncio.CancelledError:
            exchange.cancel()
            raise
        if isinstance(result, AttemptFailed):
            tracing.record_outcome(span, None, result.outcome.value, error=True)
        else:
            tracing.record_outcome(span, result.status, "answered", error=result.status >= 500)
        return result
