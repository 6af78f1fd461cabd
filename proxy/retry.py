"""The retry mechanism: pick, send, wait on one per-try timer, apply the policy's verdict.

Owns: one request's attempts under its total deadline and the route's per-try timer (the
only per-try timer: the upstream client is given the abandoned-attempt bound, not the
per-try one), the tasks of attempts and their cancellation, attempts left running past
their per-try timer (bounded; the first definitive answer wins), and turning how the
request ended into a `Settled`. When the per-try timer fires while an attempt is still
connecting, nothing can have reached the gateway: the attempt is cancelled and judged
provably unsent.
Must not: decide what is safe to resend (proxy.retry_policy does), know how gateways are
chosen (the balancer) or how HTTP is spoken (forward), or account for attempts itself: it
reports attempt events to the consumers in `Parts`.
"""

from __future__ import annotations

import asyncio
import logging
import random

from proxy import errors
from proxy.aio import first_done, keep
from proxy.attempt import ABANDONED, MAX_ABANDONED, Attempt, ClientOutcome, End, Result, Settled
from proxy.attempt import retry_after as retry_after_of
from proxy.config.model import Gateway
from proxy.exchange import start_exchange
from proxy.forward import AttemptFailed, Reply
from proxy.ids import new_id
from proxy.outbound import Outbound, Parts
from proxy.retry_policy import Ended, Past, Step, Verdict, decide, definitive
from proxy.upstream.balancer import Skip
from proxy.upstream.phase import Progress
from proxy.upstream.state import GatewayState, Outcome

logger = logging.getLogger(__name__)

#: Slack when comparing the clock with a timer that should just have fired.
EPSILON = 1e-4

_NONE_TRIED: frozenset[str] = frozenset()


class Dispatch:
    """One request's journey through the gateways.

    A plain class with its own `__init__`: a dataclass's generated one runs as interpreted
    Python even in the native build, and one of these is built per request."""

    __slots__ = (
        "attempts",
        "client_outcome",
        "deadline",
        "give_up_at",
        "history",
        "kept",
        "last",
        "live",
        "lock",
        "next_at",
        "parts",
        "refusal",
        "req",
        "skipped",
        "tried",
        "winner",
    )

    def __init__(self, req: Outbound, parts: Parts) -> None:
        self.req = req
        self.parts = parts
        self.attempts: list[Attempt] = []
        self.tried: list[errors.Tried] = []
        self.skipped: list[Skip] = []
        self.winner: Attempt | None = None
        self.client_outcome: ClientOutcome | None = None
        self.history: list[Past] = []
        self.live: dict[asyncio.Future[Result], Attempt] = {}
        self.kept: tuple[Reply, Attempt] | None = None  # best non-definitive answer so far
        self.lock: str | None = None  # the only provider allowed from now on
        self.next_at: float | None = None  # when to start the next attempt; None: no more
        self.deadline = 0.0
        self.give_up_at = 0.0
        self.last: Outcome | None = None
        self.refusal: errors.ProxyError | None = None
        if req.forced_gateway is not None and not req.idempotent:
            st = (req.states or parts.balancer.states).get(req.forced_gateway)
            if st is not None:
                # An earlier holder of the key sent it there: only that provider can dedupe it.
                self.history.append(Past(st.gateway.provider, counted=False, ambiguous=True))

    # -- what consumers read --------------------------------------------------------------

    @property
    def idempotent(self) -> bool:
        return self.req.idempotent

    def dedupes(self, first: Attempt, second: Attempt) -> bool:
        """Would the provider behind `second` recognise it as a retry of `first`?"""
        return self.req.has_key and first.gateway.provider == second.gateway.provider

    # -- the loop -------------------------------------------------------------------------

    async def run(self) -> Settled:
        clock = self.parts.clock
        timeouts = self.req.plan.route.timeouts
        now = clock.now()
        self.deadline = self.give_up_at = now + timeouts.total
        self.next_at = now
        live = self.live
        traced = self.parts.tracing
        current: Attempt | None = None
        per_try_end = self.deadline
        try:
            while True:
                now = clock.now()
                if self.next_at is not None and now >= self.next_at:
                    self.next_at = None
                    started = await self._launch(now)
                    if started is None:
                        self._no_more(clock.now())
                    else:
                        current = started
                        per_try_end = min(started.started + timeouts.per_try, self.deadline)
                if not live:
                    if self.next_at is not None:
                        await asyncio.sleep(max(0.0, self.next_at - now))
                        continue
                    return self._exhausted()
                waiting = current is not None and current.end is None
                wake = min(self.give_up_at, per_try_end) if waiting else self.give_up_at
                if self.next_at is not None:
                    wake = min(wake, self.next_at)
                # The current attempt's connection wakes this loop as it settles, when the
                # attempt's future is the exchange's own (a traced attempt is a task that
                # ends later: its callbacks wake this loop).
                waking = None
                if current is not None and current.end is None and traced is None:
                    waking = current.progress
                await first_done(live, max(0.0, wake - clock.now()), waking)
                now = clock.now()
                done = [t for t in live if t.done()]
                for task in done:
                    settled = self._ended(live.pop(task), task, now)
                    if settled is not None:
                        return settled
                if done:
                    continue
                if now >= self.give_up_at - EPSILON:
                    return self._give_up(now)
                if current is not None and current.end is None and now >= per_try_end - EPSILON:
                    self._per_try_fired(current, now)
        except asyncio.CancelledError:
            # The client went away: attempts already sent keep running so their outcome is
            # still learnt and reported; nothing new is sent.
            self.client_outcome = "unknown"
            self._leave_all(self.parts.clock.now(), Outcome.CANCELLED)
            raise

    # -- stages ---------------------------------------------------------------------------

    async def _launch(self, now: float) -> Attempt | None:
        """Pick a gateway and start an attempt on it; None when none may be tried."""
        st = self._pick(now)
        if st is None:
            return None
        att = Attempt(attempt_id=new_id(), state=st, started=now, progress=Progress())
        note = self.req.note_attempt
        if note is not None:
            # Recorded before a byte is sent, so a crash leaves the gateway behind.
            try:
                ours = await note(st.name, att.attempt_id)
            except Exception:
                logger.exception("could not record attempt %s", att.attempt_id)
                ours = False
            if not ours:
                self.refusal = errors.StoreUnavailable(
                    "the idempotency store could not record where this payment goes; this"
                    " attempt was not sent: retry with the same idempotency key",
                    route=self.req.plan.name,
                    region=self.req.region,
                    headers={"Retry-After": "2"},
                )
                return None
            att.started = self.parts.clock.now()
        self.parts.health.started(st, att.started)
        self.attempts.append(att)
        att.task = start_exchange(att, self.req, self.parts, len(self.attempts))
        self.live[att.task] = att
        return att

    def _pick(self, now: float) -> GatewayState | None:
        req, parts = self.req, self.parts
        health = parts.health
        # The first pick (nearly every request) has nothing to exclude: no set to build.
        tried = {a.gateway.name for a in self.attempts} if self.attempts else _NONE_TRIED
        if req.forced_gateway is not None and not self.attempts:
            st = (req.states or parts.balancer.states).get(req.forced_gateway)
            if st is not None and any(g.name == st.name for g in req.plan.gateways):
                return st

        def admit(st: GatewayState) -> str | None:
            return health.admit(st, now)

        allow = None
        if self.lock is not None:
            lock = self.lock

            def allow(gw: Gateway) -> bool:
                return gw.provider == lock

        return parts.balancer.pick(
            req.plan, req.region, admit, tried, allow, self.skipped, req.states, now
        )

    # -- judging --------------------------------------------------------------------------

    def _ended(self, att: Attempt, task: asyncio.Future[Result], now: float) -> Settled | None:
        """An attempt's exchange finished; a Settled when the request is decided."""
        current = att.end is None
        if task.cancelled():  # closed under us (shutdown): judged by how far it got
            reached = att.progress.reached_gateway
            result: Result = AttemptFailed(Outcome.RESET, "exchange cancelled", sent=reached)
        else:
            result = task.result()
        latency = now - att.started
        if isinstance(result, AttemptFailed):
            self._report(att, result.outcome, latency)
            if not current:
                return None  # an abandoned attempt failed after all: still unresolved
            self._tried(att, result.outcome.value)
            self.last = result.outcome
            reached = result.sent or att.progress.reached_gateway
            self._follow(att, Ended(att.gateway.provider, result.outcome, reached), now)
            return None
        status = result.status
        outcome = _health_outcome(status)
        retry_after = retry_after_of(result) if status == 429 else None
        if definitive(self.req.plan.route.retry, status):
            # The answer is written in this step of the loop: what the gateway's health
            # learns from it waits for the next turn, after the answer has gone out.
            self._report(att, outcome, latency, retry_after, soon=task.get_loop())
            return self._win(att, result, final=True)
        self._report(att, outcome, latency, retry_after)
        self._keep(result, att)
        if not current:
            return None
        self._tried(att, str(status), status)
        self.last = outcome
        self._follow(att, Ended(att.gateway.provider, outcome, True, status), now)
        return None

    def _per_try_fired(self, att: Attempt, now: float) -> None:
        reached = att.progress.reached_gateway
        if reached:
            self._report(att, Outcome.TIMEOUT, now - att.started)
            self._tried(att, Outcome.TIMEOUT.value)
        else:
            # Still connecting (a black-hole gateway): nothing reached it. Stop the connect.
            self._cancel(att)
            self._report(att, Outcome.CONNECT_FAILURE, now - att.started)
            self._tried(att, "connect_timeout")
        self.last = Outcome.TIMEOUT
        verdict = self._follow(att, Ended(att.gateway.provider, Outcome.TIMEOUT, reached), now)
        if verdict.counts:
            self._abandon(att)

    def _follow(self, att: Attempt, ended: Ended, now: float) -> Verdict:
        """Apply the policy's verdict on `ended`, the current attempt's end."""
        req = self.req
        retry = req.plan.route.retry
        verdict = decide(retry, req.method, req.has_key, self.history, ended)
        att.end = End.AMBIGUOUS if verdict.counts else End.UNSENT
        self.history.append(Past(ended.provider, verdict.counts, ambiguous=verdict.counts))
        if verdict.step is Step.RETRY_ANYWHERE or verdict.step is Step.RETRY_WITHIN_PROVIDER:
            self.lock = verdict.provider
            self.next_at = now + (self._backoff() if verdict.counts else 0.0)
        else:
            self._no_more(now)
        return verdict

    def _no_more(self, now: float) -> None:
        """No gateway may take this request any more; wait only for attempts left running."""
        self.next_at = None
        if not self.req.idempotent and self.live:
            after = self.req.plan.route.timeouts.unknown_after
            self.give_up_at = min(self.give_up_at, now + after)

    def _report(
        self,
        att: Attempt,
        outcome: Outcome,
        latency: float,
        retry_after: float | None = None,
        *,
        soon: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        """Tell health and the metrics how `att` ended, once; on `soon`'s next turn when
        given."""
        if att.reported:
            return
        att.reported = True
        now = self.parts.clock.now()
        if soon is None:
            self._learn(att, outcome, latency, now, retry_after)
        else:
            soon.call_soon(self._learn, att, outcome, latency, now, retry_after)

    def _learn(
        self,
        att: Attempt,
        outcome: Outcome,
        latency: float,
        now: float,
        retry_after: float | None = None,
    ) -> None:
        """Health and the attempt metrics take in one attempt's outcome."""
        parts = self.parts
        parts.health.finished(att.state, outcome, latency, now, retry_after)
        if parts.attempt_ended is not None:
            parts.attempt_ended(self, att, outcome, latency)

    def _tried(self, att: Attempt, outcome: str, status: int | None = None) -> None:
        self.tried.append(
            errors.Tried(
                gateway=att.gateway.name, outcome=outcome, status=status, attempt_id=att.attempt_id
            )
        )

    def _backoff(self) -> float:
        b = self.req.plan.route.retry.backoff
        n = max(0, len(self.attempts) - 1)
        return random.uniform(0, min(b.max, b.base * (2**n)))

    # -- leaving attempts -----------------------------------------------------------------

    def _cancel(self, att: Attempt) -> None:
        task = att.task
        if task is not None:
            self.live.pop(task, None)
            task.cancel()

    def _abandon(self, att: Attempt) -> None:
        """Stop waiting for `att`; a payment's exchange goes on (bounded) to learn its end."""
        att.end = End.ABANDONED
        task = att.task
        if task is None or task.done():
            return
        if self.req.idempotent or ABANDONED.open >= MAX_ABANDONED:
            self._cancel(att)
        else:
            ABANDONED.track(task)

    def _leave_all(self, now: float, outcome: Outcome) -> None:
        """The request is decided: attempts still running are left, or cancelled when
        provably unsent (still connecting); sent ones are watched for a late answer."""
        for att in list(self.live.values()):
            if not att.progress.reached_gateway:
                self._cancel(att)
                self._report(att, Outcome.CONNECT_FAILURE, now - att.started)
                att.end = End.UNSENT
                continue
            if att.end is None:
                self._report(att, outcome, now - att.started)
                if outcome is Outcome.TIMEOUT:
                    self._tried(att, outcome.value)
                self._abandon(att)
            self._watch_late(att)
        self.live.clear()

    def _watch_late(self, att: Attempt) -> None:
        task = att.task
        if task is None or task.done():
            return
        keep(task)
        late = self.parts.late_result
        if late is None:
            return

        def done(t: asyncio.Future[Result]) -> None:
            if t.cancelled():
                return
            result = t.result()
            try:
                late(self, att, result)
            finally:
                if isinstance(result, Reply):
                    result.release()

        task.add_done_callback(done)

    # -- how the request ends -------------------------------------------------------------

    def _keep(self, reply: Reply, att: Attempt) -> None:
        if self.kept is not None:
            self.kept[0].release()
        self.kept = (reply, att)

    def _win(self, att: Attempt, reply: Reply, *, final: bool) -> Settled:
        self.winner = att
        if final:
            att.end = End.ANSWERED
        if self.kept is not None and self.kept[0] is not reply:
            self.kept[0].release()
        self.kept = None
        self.client_outcome = "success" if reply.status < 400 else "failure"
        if self.live:
            self._leave_all(self.parts.clock.now(), Outcome.CANCELLED)
        return Settled(reply=reply, attempt=att, attempts=self.attempts, tried=self.tried)

    def _exhausted(self) -> Settled:
        """Nothing is running and nothing more may start."""
        if self.kept is not None:
            reply, att = self.kept
            return self._win(att, reply, final=False)
        req = self.req
        skipped = [
            errors.Tried(gateway=s.gateway, outcome=f"skipped:{s.reason}") for s in self.skipped
        ]
        err: errors.ProxyError
        if not self.attempts:
            self.client_outcome = "failure"
            if self.refusal is not None:
                return Settled(None, None, self.attempts, self.tried, self.refusal)
            reasons = (
                ", ".join(f"{s.gateway}: {s.reason}" for s in self.skipped)
                or "no gateway in any allowed region"
            )
            err = errors.NoGatewayAvailable(
                f"no gateway can take this request ({reasons})",
                route=req.plan.name,
                region=req.region,
                tried=skipped,
            )
            return Settled(None, None, self.attempts, self.tried, err)
        tried = self.tried + skipped
        if not req.idempotent and any(a.unresolved for a in self.attempts):
            return self._unknown(
                "the payment was sent and its outcome was lost; do not assume it failed: retry with the same idempotency key or reconcile by transaction id",
                tried,
                504 if self.last is Outcome.TIMEOUT else 502,
            )
        self.client_outcome = "failure"
        if self.tried and all(t.outcome == Outcome.LOCAL.value for t in self.tried):
            err = errors.NoGatewayAvailable(
                "payswitch could not open a connection (out of file descriptors, or every "
                "gateway tried at its connection cap); no gateway was contacted",
                tried=tried,
            )
        elif self.last is Outcome.TIMEOUT:
            err = errors.DeadlineExceeded("every attempt timed out", tried=tried)
        else:
            err = errors.UpstreamFailed("every attempt failed", tried=tried)
        err.route, err.region = req.plan.name, req.region
        return Settled(None, None, self.attempts, self.tried, err)

    def _give_up(self, now: float) -> Settled:
        """The total deadline, or `unknown_after` once no gateway was left, has passed."""
        req = self.req
        at_deadline = now >= self.deadline - EPSILON
        self._leave_all(now, Outcome.TIMEOUT)
        self.tried.append(
            errors.Tried(gateway="-", outcome="deadline" if at_deadline else "unknown_after")
        )
        if not req.idempotent and any(a.unresolved for a in self.attempts):
            total = req.plan.route.timeouts.total
            detail = (
                f"no definitive answer within the route's total timeout ({total:g}s)"
                if at_deadline
                else "no definitive answer and no gateway left that could take the payment safely"
            )
            return self._unknown(
                f"{detail}; the payment may still complete: retry with the same idempotency key or reconcile by transaction id",
                self.tried,
                504,
            )
        self.client_outcome = "failure"
        err = errors.DeadlineExceeded(
            f"no answer within the route's total timeout ({req.plan.route.timeouts.total:g}s)",
            route=req.plan.name,
            region=req.region,
            tried=self.tried,
        )
        return Settled(None, None, self.attempts, self.tried, err)

    def _unknown(self, detail: str, tried: list[errors.Tried], status: int) -> Settled:
        self.client_outcome = "unknown"
        err = errors.OutcomeUnknown(
            detail, route=self.req.plan.name, region=self.req.region, tried=tried
        )
        err.status = status
        return Settled(None, None, self.attempts, self.tried, err, unknown=True)


def _health_outcome(status: int) -> Outcome:
    if status == 429:
        return Outcome.THROTTLED
    if status >= 500:
        return Outcome.SERVER_ERROR
    return Outcome.SUCCESS
