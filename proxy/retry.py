"""The retry loop: pick, forward, judge the outcome, and maybe pick again.

Owns: one request's attempts under its total deadline and per-try timer, and the payment
safety rules of shared/DESIGN.md §5: a request that provably reached no gateway is sent
elsewhere; after an ambiguous failure (sent, then timeout / reset / 5xx) a non-idempotent
request is resent only as the route's `after_ambiguous` allows; an attempt abandoned on
its per-try timer keeps running (bounded) and the first definitive answer wins; an
abandoned attempt that answers after the request was settled is reported.
Must not: know how gateways are chosen (the balancer) or how HTTP is spoken (forward).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from multidict import CIMultiDict

from proxy import errors
from proxy.aio import first_done, keep, spawn_owned
from proxy.attempt import (
    ABANDONED,
    MAX_ABANDONED,
    Attempt,
    ClientOutcome,
    Result,
    Settled,
    retry_after,
)
from proxy.clock import Clock
from proxy.config.model import IDEMPOTENT_METHODS, Gateway
from proxy.forward import AttemptFailed, Forwarder, Reply
from proxy.ids import new_id
from proxy.routing import RoutePlan
from proxy.tracing import Tracing
from proxy.upstream.balancer import Balancer, Skip
from proxy.upstream.health import Health
from proxy.upstream.state import GatewayState, Outcome

logger = logging.getLogger(__name__)

LateHandler = Callable[["Dispatch", Attempt, Reply | AttemptFailed], None]


@dataclass(slots=True)
class Dispatch:
    """One request's journey through the gateways."""

    plan: RoutePlan
    region: str
    method: str
    path_qs: str
    headers: CIMultiDict[str]
    body: bytes
    transaction_id: str
    balancer: Balancer
    health: Health
    forwarder: Forwarder
    clock: Clock
    attempt_header: str
    transaction_header: str
    on_late: LateHandler | None = None
    on_attempt: Callable[[Attempt, str, float], None] | None = None
    client_outcome: ClientOutcome | None = None
    winner: Attempt | None = None
    attempts: list[Attempt] = field(default_factory=list)
    tried: list[errors.Tried] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    forced_gateway: str | None = None  # an unresolved key goes back to the gateway that saw it
    tracing: Tracing | None = None  # set only when tracing is enabled
    _did_nothing: int = 0  # attempts that provably did nothing: they use up no retry
    has_key: bool = False  # the request carries an idempotency key the gateway can dedupe by
    states: Mapping[str, GatewayState] | None = None  # the gateways of the request's rules

    @property
    def idempotent(self) -> bool:
        return self.method in IDEMPOTENT_METHODS

    async def run(self) -> Settled:
        route = self.plan.route
        retry = route.retry
        timeouts = route.timeouts
        clock = self.clock
        now = clock.now()
        deadline = now + timeouts.total
        live: dict[asyncio.Future[Result], Attempt] = {}
        current: Attempt | None = None
        per_try_end = deadline
        next_at = now
        want_new = True
        provider_lock: str | None = None
        exclude: set[str] = set()
        kept_reply: tuple[Reply, Attempt] | None = None
        last_failure: Outcome | None = None
        try:
            while True:
                now = clock.now()
                if want_new and now >= next_at:
                    want_new = False
                    # `attempts` bounds what gateways may have processed; an attempt that
                    # provably did nothing does not use it up (each gateway is tried once).
                    used = len(self.attempts) - self._did_nothing
                    if used < retry.attempts:
                        st = self._pick(exclude, provider_lock)
                        if st is not None:
                            current = self._start(st, now)
                            assert current.task is not None
                            live[current.task] = current
                            exclude.add(st.name)
                            per_try_end = min(now + timeouts.per_try, deadline)
                if not live:
                    if want_new:
                        await asyncio.sleep(max(0.0, next_at - now))
                        continue
                    return self._exhausted(kept_reply, last_failure)
                wake = deadline
                if current is not None and not current.abandoned:
                    wake = min(wake, per_try_end)
                if want_new:
                    wake = min(wake, next_at)
                await first_done(live, max(0.0, wake - clock.now()))
                done = [t for t in live if t.done()]
                now = clock.now()
                if not done:
                    if now >= deadline - 1e-4:
                        return self._deadline(live)
                    if current is not None and not current.abandoned and now >= per_try_end - 1e-4:
                        self._abandon(current, now, live)
                        last_failure = Outcome.TIMEOUT
                        if self._may_retry(Outcome.TIMEOUT, None, sent=True):
                            provider_lock = self._lock_after_ambiguous(current, provider_lock)
                            want_new, next_at = True, now + self._backoff()
                    continue
                for task in done:
                    att = live.pop(task)
                    outcome, reply, failure = self._judge(att, task, now)
                    if reply is not None and outcome is None:
                        return self._win(att, reply, live)
                    if att.abandoned or att is not current:
                        if reply is not None:
                            kept_reply = self._keep(kept_reply, reply, att)
                        continue
                    # The current attempt failed; decide whether another gateway may try.
                    assert outcome is not None
                    last_failure = outcome
                    sent = failure.sent if failure is not None else True
                    status = reply.status if reply is not None else None
                    safe = not sent or (
                        status is not None and (status == 429 or status in retry.not_processed)
                    )
                    if reply is not None:
                        kept_reply = self._keep(kept_reply, reply, att)
                    att.did_nothing = safe
                    self._did_nothing += safe
                    if safe or self._may_retry(outcome, status, sent=sent):
                        if not safe:
                            provider_lock = self._lock_after_ambiguous(att, provider_lock)
                        want_new = True
                        next_at = now if not sent else now + self._backoff()
                    elif reply is not None and not live:
                        kept_reply = None
                        return self._win(att, reply, live)
        except asyncio.CancelledError:
            # The client went away: attempts already sent keep running so their outcome is
            # still learnt and reported; nothing new is sent.
            self.client_outcome = "unknown"
            for att in list(live.values()):
                self._abandon(att, clock.now(), live)
                self._watch_late(att)
            raise

    # -- stages ---------------------------------------------------------------------------

    def _pick(self, exclude: set[str], provider_lock: str | None) -> GatewayState | None:
        now = self.clock.now()
        health = self.health

        def admit(st: GatewayState) -> str | None:
            return health.admit(st, now)

        if self.forced_gateway is not None and not self.attempts:
            st = (self.states or self.balancer.states).get(self.forced_gateway)
            if st is not None and st.gateway.name in {g.name for g in self.plan.gateways}:
                return st
        allow = None
        if provider_lock is not None:
            lock = provider_lock

            def allow(gw: Gateway) -> bool:
                return gw.provider == lock

        return self.balancer.pick(
            self.plan, self.region, admit, exclude, allow, self.skipped, self.states
        )

    def _start(self, st: GatewayState, now: float) -> Attempt:
        att = Attempt(attempt_id=new_id(), state=st, started=now)
        self.health.started(st, now)
        self.attempts.append(att)
        cap = (
            self.plan.route.timeouts.per_try
            if self.idempotent
            else self.plan.route.timeouts.abandoned
        )
        headers = self.headers.copy()
        headers[self.attempt_header] = att.attempt_id
        if self.tracing is None:
            att.task = self._exchange(att, cap, headers)
        else:
            att.task = spawn_owned(
                self._send_traced(att, cap, headers, self.tracing),
                name=f"attempt:{st.name}:{att.attempt_id}",
            )
        return att

    async def _send_traced(
        self, att: Attempt, cap: float, headers: CIMultiDict[str], tracing: Tracing
    ) -> Result:
        with tracing.attempt_span(att.gateway.name, att.attempt_id, len(self.attempts)) as span:
            tracing.inject(headers)
            exchange = self._exchange(att, cap, headers)
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

    def _exchange(
        self, att: Attempt, cap: float, headers: CIMultiDict[str]
    ) -> asyncio.Future[Result]:
        try:
            return self._start_exchange(att, cap, headers)
        except Exception as exc:  # a bug, not a gateway failure: ambiguous, and loud
            logger.exception("attempt %s crashed", att.attempt_id)
            failed: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            failed.set_result(
                AttemptFailed(Outcome.BAD_RESPONSE, f"internal error: {exc!r}", sent=True)
            )
            return failed

    def _start_exchange(
        self, att: Attempt, cap: float, headers: CIMultiDict[str]
    ) -> asyncio.Future[Result]:
        return self.forwarder.start(
            att.gateway,
            self.method,
            self.path_qs,
            headers,
            self.body,
            connect_timeout=self.plan.route.timeouts.connect,
            within=cap,
        )

    def _judge(
        self, att: Attempt, task: asyncio.Future[Result], now: float
    ) -> tuple[Outcome | None, Reply | None, AttemptFailed | None]:
        """(failure outcome or None for a definitive answer, reply, failure)."""
        retry = self.plan.route.retry
        latency = now - att.started
        result = task.result()
        if isinstance(result, AttemptFailed):
            failure = result
            att.sent_unresolved = failure.sent
            self._report(att, failure.outcome, latency)
            self.tried.append(
                errors.Tried(
                    gateway=att.gateway.name,
                    outcome=failure.outcome.value,
                    attempt_id=att.attempt_id,
                )
            )
            return failure.outcome, None, failure
        reply = result
        status = reply.status
        if status == 429:
            self._report(att, Outcome.THROTTLED, latency, retry_after(reply))
            outcome: Outcome | None = Outcome.THROTTLED
        elif status >= 500:
            self._report(att, Outcome.SERVER_ERROR, latency)
            outcome = (
                Outcome.SERVER_ERROR
                if status in retry.on_statuses or status in retry.not_processed
                else None
            )
        else:
            self._report(att, Outcome.SUCCESS, latency)
            outcome = (
                Outcome.SERVER_ERROR
                if status in retry.on_statuses or status in retry.not_processed
                else None
            )
        if outcome is not None:
            self.tried.append(
                errors.Tried(
                    gateway=att.gateway.name,
                    outcome=f"status_{status}",
                    status=status,
                    attempt_id=att.attempt_id,
                )
            )
        return outcome, reply, None

    def _report(
        self, att: Attempt, outcome: Outcome, latency: float, retry_after: float | None = None
    ) -> None:
        if att.reported:
            return
        att.reported = True
        self.health.finished(att.state, outcome, latency, self.clock.now(), retry_after)
        if self.on_attempt is not None:
            self.on_attempt(att, outcome.value, latency)

    def _may_retry(self, outcome: Outcome, status: int | None, *, sent: bool) -> bool:
        """May an ambiguous failure be sent to another gateway (attempts permitting)?"""
        retry = self.plan.route.retry
        if outcome is Outcome.TIMEOUT:
            enabled = retry.on_timeout
        elif outcome in (Outcome.RESET, Outcome.BAD_RESPONSE):
            enabled = retry.on_reset
        else:
            enabled = status is not None and status in retry.on_statuses
        if not enabled:
            return False
        if self.idempotent or retry.after_ambiguous == "any-gateway":
            return True
        # same-provider is safe only because the provider dedupes the forwarded key.
        return retry.after_ambiguous == "same-provider" and self.has_key

    def _lock_after_ambiguous(self, att: Attempt, lock: str | None) -> str | None:
        if self.idempotent or self.plan.route.retry.after_ambiguous != "same-provider":
            return lock
        return att.gateway.provider

    def _backoff(self) -> float:
        b = self.plan.route.retry.backoff
        n = max(0, len(self.attempts) - 1)
        return random.uniform(0, min(b.max, b.base * (2**n)))

    def _abandon(
        self, att: Attempt, now: float, live: dict[asyncio.Future[Result], Attempt]
    ) -> None:
        """Stop waiting for `att` on the per-try timer; its exchange may go on (bounded)."""
        att.abandoned = True
        att.sent_unresolved = True
        self._report(att, Outcome.TIMEOUT, now - att.started)
        if not any(t.attempt_id == att.attempt_id for t in self.tried):
            self.tried.append(
                errors.Tried(gateway=att.gateway.name, outcome="timeout", attempt_id=att.attempt_id)
            )
        task = att.task
        if task is None or task.done():
            return
        if self.idempotent or ABANDONED.open >= MAX_ABANDONED:
            live.pop(task, None)
            task.cancel()
        else:
            ABANDONED.track(task)

    def _keep(
        self, kept: tuple[Reply, Attempt] | None, reply: Reply, att: Attempt
    ) -> tuple[Reply, Attempt]:
        if kept is not None:
            kept[0].release()
        return (reply, att)

    def _win(
        self, att: Attempt, reply: Reply, live: dict[asyncio.Future[Result], Attempt]
    ) -> Settled:
        self.winner = att
        att.sent_unresolved = False
        self.client_outcome = "success" if reply.status < 400 else "failure"
        for other in list(live.values()):
            other.abandoned = True
            other.sent_unresolved = True
            self._report(other, Outcome.CANCELLED, self.clock.now() - other.started)
            self._watch_late(other)
        for other in self.attempts:
            if (
                other is not att
                and other.abandoned
                and other.task is not None
                and other.task.done()
            ):
                continue
        return Settled(reply=reply, attempt=att, attempts=self.attempts, tried=self.tried)

    def _exhausted(self, kept: tuple[Reply, Attempt] | None, last: Outcome | None) -> Settled:
        route, region = self.plan.name, self.region
        if kept is not None:
            reply, att = kept
            return self._win(att, reply, {})
        if not self.attempts:
            reasons = (
                ", ".join(f"{s.gateway}: {s.reason}" for s in self.skipped)
                or "no gateway in any allowed region"
            )
            tried = [
                errors.Tried(gateway=s.gateway, outcome=f"skipped:{s.reason}") for s in self.skipped
            ]
            err: errors.ProxyError = errors.NoGatewayAvailable(
                f"no gateway can take this request ({reasons})",
                route=route,
                region=region,
                tried=tried,
            )
            self.client_outcome = "failure"
            return Settled(None, None, self.attempts, self.tried, err)
        unknown = not self.idempotent and any(a.sent_unresolved for a in self.attempts)
        tried = self.tried + [
            errors.Tried(gateway=s.gateway, outcome=f"skipped:{s.reason}") for s in self.skipped
        ]
        if unknown:
            self.client_outcome = "unknown"
            status = 504 if last is Outcome.TIMEOUT else 502
            err = errors.OutcomeUnknown(
                "the payment was sent and its outcome was lost; do not assume it failed: retry with the same idempotency key or reconcile by transaction id",
                route=route,
                region=region,
                tried=tried,
            )
            err.status = status
            for att in self.attempts:
                if att.abandoned:
                    self._watch_late(att)
            return Settled(None, None, self.attempts, self.tried, err, unknown=True)
        self.client_outcome = "failure"
        if self.tried and all(t.outcome == Outcome.LOCAL.value for t in self.tried):
            err = errors.NoGatewayAvailable(
                "payswitch could not open a connection (out of file descriptors, or every "
                "gateway tried at its connection cap); no gateway was contacted",
                route=route,
                region=region,
                tried=tried,
            )
        elif last is Outcome.TIMEOUT:
            err = errors.DeadlineExceeded(
                "every attempt timed out", route=route, region=region, tried=tried
            )
        else:
            err = errors.UpstreamFailed(
                "every attempt failed", route=route, region=region, tried=tried
            )
        return Settled(None, None, self.attempts, self.tried, err)

    def _deadline(self, live: dict[asyncio.Future[Result], Attempt]) -> Settled:
        now = self.clock.now()
        for att in list(live.values()):
            if not att.abandoned:
                self._abandon(att, now, live)
        self.tried.append(errors.Tried(gateway="-", outcome="deadline"))
        if not self.idempotent:
            self.client_outcome = "unknown"
            for att in list(live.values()):
                self._watch_late(att)
            err: errors.ProxyError = errors.OutcomeUnknown(
                f"no definitive answer within the route's total timeout ({self.plan.route.timeouts.total:g}s); the payment may still complete: retry with the same idempotency key or reconcile by transaction id",
                route=self.plan.name,
                region=self.region,
                tried=self.tried,
            )
            return Settled(None, None, self.attempts, self.tried, err, unknown=True)
        for att in list(live.values()):
            if att.task is not None:
                att.task.cancel()
        self.client_outcome = "failure"
        err = errors.DeadlineExceeded(
            f"no answer within the route's total timeout ({self.plan.route.timeouts.total:g}s)",
            route=self.plan.name,
            region=self.region,
            tried=self.tried,
        )
        return Settled(None, None, self.attempts, self.tried, err)

    def dedupes(self, first: Attempt, second: Attempt) -> bool:
        """Would the provider behind `second` recognise it as a retry of `first`?"""
        return self.has_key and first.gateway.provider == second.gateway.provider

    def _watch_late(self, att: Attempt) -> None:
        task = att.task
        if task is not None:
            keep(task)
        if task is None or self.on_late is None:
            return
        on_late = self.on_late

        def done(t: asyncio.Future[Result]) -> None:
            if t.cancelled():
                return
            result = t.result()
            try:
                on_late(self, att, result)
            finally:
                if isinstance(result, Reply):
                    result.release()

        task.add_done_callback(done)
