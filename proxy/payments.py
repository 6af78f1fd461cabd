"""Payment safety around the retry loop: idempotency keys and the transaction log.

Owns: claiming a request's Idempotency-Key before anything is sent (409 while in flight,
replay after completion, 422 for a changed payload, the gateway that last saw an unresolved
key), settling the key with what the client was told, and the transaction record that
`GET /admin/transactions/{id}` reads.
Must not: pick gateways or judge attempts (retry.py), judge late answers (ledger.py), or
write the client's response.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from multidict import CIMultiDict, CIMultiDictProxy

from proxy import errors
from proxy.aio import spawn
from proxy.config.model import Idempotency
from proxy.http import Answer
from proxy.idempotency import (
    Claimed,
    ClaimResult,
    Completed,
    IdempotencyStore,
    InFlight,
    InvalidIdempotencyKey,
    MemoryIdempotencyStore,
    Mismatch,
    StoredResponse,
    StoreFull,
    TransactionStore,
    Unresolved,
    fingerprint,
    gateway_key,
    scoped_key,
    validate_key,
)
from proxy.idempotency.guard import StoreGuard
from proxy.metrics import Metrics
from proxy.routing import RoutePlan

if TYPE_CHECKING:
    from proxy.attempt import Attempt, Settled
    from proxy.retry import Dispatch

logger = logging.getLogger(__name__)

REPLAYED_HEADER = "Idempotent-Replayed"
#: How long past a route's total timeout a claim stays locked if its holder vanishes.
LOCK_MARGIN = 5.0


@dataclass(slots=True)
class Ticket:
    """A claimed idempotency key for the duration of one request."""

    key: str
    lease: str
    policy: Idempotency
    transaction_id: str
    forced_gateway: str | None  # an unresolved key goes back to the gateway that saw it
    store: IdempotencyStore  # where the key is held: the store, or the local fallback
    forward_key: str  # the key the gateway gets: see idempotency.gateway_key


#: Retry-After, in seconds, on a keyed payment refused while the store is down.
STORE_DOWN_RETRY_AFTER = 2


class Payments:
    def __init__(
        self,
        keys: IdempotencyStore,
        log: TransactionStore,
        metrics: Metrics,
        *,
        guard: StoreGuard | None = None,
        fallback: MemoryIdempotencyStore | None = None,
    ) -> None:
        self.keys = keys
        self.log = log
        self.metrics = metrics
        self.guard = guard or StoreGuard(_always_up, registry=metrics.registry)
        #: Holds keys of `on_store_down: local` routes while the store is down.
        self.fallback = fallback or MemoryIdempotencyStore()
        #: Requests being dispatched, by transaction id: their PENDING record is built
        #: when someone asks rather than written to the log on every request.
        self.in_flight: dict[str, tuple[Dispatch, float]] = {}
        #: The outage (`guard.outages`) each route's local fallback was last logged in:
        #: once per outage, not once per payment.
        self._fallback_said: dict[str, int] = {}

    async def claim(
        self,
        plan: RoutePlan,
        method: str,
        raw_path: str,
        headers: CIMultiDictProxy[str],
        body: bytes,
    ) -> Ticket | Answer | None:
        """A Ticket to proceed with, a response to send instead (replay, 409, 422), or None
        when the route or method does not use idempotency keys. Raises ProxyError (400)."""
        policy = plan.idempotency
        if policy is None:
            return None
        raw = headers.get(policy.header)
        if raw is None:
            if policy.required:
                self._count(plan, "missing")
                raise errors.BadRequest(
                    f"route {plan.name} requires an {policy.header} header", route=plan.name
                )
            return None
        try:
            key = validate_key(raw)
        except InvalidIdempotencyKey as exc:
            self._count(plan, "invalid")
            raise errors.BadRequest(str(exc), route=plan.name) from None
        scope = headers.get(policy.scope_header) if policy.scope_header else None
        skey = scoped_key(key, scope)
        fkey = gateway_key(key, scope)
        fp = fingerprint(method, raw_path, body)
        store, result = await self._claim(plan, skey, fp)
        return self._ticket(plan, policy, skey, fkey, store, result)

    def _ticket(
        self,
        plan: RoutePlan,
        policy: Idempotency,
        skey: str,
        fkey: str,
        store: IdempotencyStore,
        result: ClaimResult,
    ) -> Ticket | Answer:
        """What a claim's result means for the request."""
        if isinstance(result, Claimed):
            self._count(plan, "claimed")
            return Ticket(
                key=skey,
                lease=result.lease,
                policy=policy,
                transaction_id=fkey,
                forced_gateway=None,
                store=store,
                forward_key=fkey,
            )
        if isinstance(result, Unresolved):
            self._count(plan, "unresolved_retry")
            return Ticket(
                key=skey,
                lease=result.lease,
                policy=policy,
                transaction_id=result.transaction_id or fkey,
                forced_gateway=result.last_gateway,
                store=store,
                forward_key=fkey,
            )
        if isinstance(result, Completed):
            self._count(plan, "replayed")
            stored = result.response
            replayed = CIMultiDict(stored.headers)
            replayed[REPLAYED_HEADER] = "true"
            return Answer(stored.status, replayed, stored.body)
        if isinstance(result, InFlight):
            self._count(plan, "conflict")
            raise errors.Conflict(
                "a request with this idempotency key is still being processed; retry later",
                route=plan.name,
                headers={"Retry-After": str(max(1, int(result.retry_after + 0.999)))},
            )
        assert isinstance(result, Mismatch)
        self._count(plan, "mismatch")
        raise errors.Unprocessable(
            "this idempotency key was used with a different request (method, path or body)",
            route=plan.name,
        )

    async def _claim(
        self, plan: RoutePlan, key: str, fp: str
    ) -> tuple[IdempotencyStore, ClaimResult]:
        """Claim on the store; while it is down, as the route's `on_store_down` says."""
        policy = plan.idempotency
        assert policy is not None
        lock_ttl = plan.route.timeouts.total + LOCK_MARGIN
        guard = self.guard
        fallback = self.fallback
        if policy.on_store_down == "local" and fallback.holds(key):
            # Taken here during an outage: the shared store never saw it, so a retry of it
            # stays here until it expires, or it would be sent a second time.
            return fallback, await fallback.claim(key, fp, policy.ttl, lock_ttl=lock_ttl)
        if guard.up:
            try:
                result = await self.keys.claim(key, fp, policy.ttl, lock_ttl=lock_ttl)
            except StoreFull as full:
                self._count(plan, "store_full")
                raise errors.StoreUnavailable(
                    f"{full}; the payment was not sent",
                    route=plan.name,
                    headers={"Retry-After": str(max(1, round(full.retry_after)))},
                ) from None
            except Exception as exc:
                guard.failed("claim", exc)
            else:
                guard.succeeded()
                return self.keys, result
        else:
            # Known down and being probed: trying would only wait for the timeout.
            guard.skipped("claim")
        if policy.on_store_down != "local":
            self._count(plan, "store_down")
            raise errors.StoreUnavailable(
                "the idempotency store does not answer; the payment was not sent: retry"
                " with the same idempotency key",
                route=plan.name,
                headers={"Retry-After": str(STORE_DOWN_RETRY_AFTER)},
            )
        self._count(plan, "local_fallback")
        if self._fallback_said.get(plan.name) != guard.outages:
            self._fallback_said[plan.name] = guard.outages
            logger.warning(
                "route %s: store down, each key held in this process only until it is back",
                plan.name,
            )
        return fallback, await fallback.claim(key, fp, policy.ttl, lock_ttl=lock_ttl)

    async def settle(
        self,
        ticket: Ticket,
        settled: Settled,
        status: int,
        headers: CIMultiDict[str],
        body: bytes | None,
    ) -> None:
        """Record what the client is told, so a retry with the same key gets the same."""
        try:
            if settled.reply is not None and settled.attempt is not None:
                if status >= 500 or status == 429:
                    # A gateway's 5xx is ambiguous: keep the key unresolved and pinned to it.
                    await self._unknown(ticket, settled.attempt)
                    return
                stored = StoredResponse(
                    status=status,
                    headers=tuple(
                        headers.items()
                    ),  # already end-to-end: see forward.response_headers
                    body=body if body is not None else b"",
                    gateway=settled.attempt.gateway.name,
                    transaction_id=ticket.transaction_id,
                )
                await ticket.store.complete(ticket.key, ticket.lease, stored, ticket.policy.ttl)
                return
            sent = [a for a in settled.attempts if not a.did_nothing]
            if sent:
                # Sent and no definitive answer: whatever the client was told, only the
                # gateway that saw it last can dedupe a retry.
                await self._unknown(ticket, sent[-1])
            else:
                # Nothing reached any gateway: the client may simply try again.
                await ticket.store.release(ticket.key, ticket.lease)
        except Exception as exc:
            self._store_failed(ticket, "settle", exc)

    async def note_attempt(self, ticket: Ticket, gateway: str, attempt_id: str) -> bool:
        """Record, before it is sent, which gateway the key is about to go to: a payswitch
        that dies mid-attempt still leaves it behind for the next holder. False when the
        key is no longer ours (its lock expired and another request took it over) or the
        store cannot say: the attempt is then not sent."""
        try:
            return await ticket.store.record_attempt(
                ticket.key,
                ticket.lease,
                gateway=gateway,
                attempt_id=attempt_id,
                transaction_id=ticket.transaction_id,
            )
        except Exception as exc:
            self._store_failed(ticket, "record_attempt", exc)
            return False

    async def _unknown(self, ticket: Ticket, att: Attempt) -> None:
        await ticket.store.mark_unknown(
            ticket.key,
            ticket.lease,
            att.gateway.name,
            att.attempt_id,
            ticket.policy.ttl,
            transaction_id=ticket.transaction_id,
        )

    async def release(self, ticket: Ticket) -> None:
        try:
            await ticket.store.release(ticket.key, ticket.lease)
        except Exception as exc:
            self._store_failed(ticket, "release", exc)

    def _store_failed(self, ticket: Ticket, op: str, exc: Exception) -> None:
        """The key's claim will lapse on its lock TTL and be taken over as unresolved, which
        is the safe reading of a holder that could not say how it ended."""
        if ticket.store is self.keys:
            self.guard.failed(op, exc)
        else:
            logger.exception("could not %s idempotency key %s", op, ticket.key)

    # -- the transaction log --------------------------------------------------------------

    async def lookup(self, transaction_id: str) -> dict[str, object] | None:
        """The transaction's record: PENDING while in flight here, else from the log."""
        live = self.in_flight.get(transaction_id)
        if live is not None:
            return transaction_record(live[0], "PENDING", None, live[1])
        return await self.log.get(transaction_id)

    async def record(
        self, dispatch: Dispatch, state: str, status: int | None, started_wall: float
    ) -> None:
        guard = self.guard
        if not guard.up:
            # The store is down and being probed: a write would only wait for its timeout,
            # delaying this answer, and fail. Counted, not logged per payment.
            guard.skipped("record")
            return
        record = transaction_record(dispatch, state, status, started_wall)
        try:
            await self.log.put(record)
        except (ValueError, TypeError):
            logger.exception("could not record transaction %s", dispatch.req.transaction_id)
        except Exception as exc:
            guard.failed("record", exc)  # one log line and one store.down per outage

    def record_late(self, dispatch: Dispatch, kind: str, att: Attempt, status: int | None) -> None:
        """Add a late answer to the transaction's record, off the request path."""

        async def update() -> None:
            try:
                record = await self.log.get(dispatch.req.transaction_id) or transaction_record(
                    dispatch, "UNKNOWN", None, time.time()
                )
                prior = record.get("late_results")
                late = list(prior) if isinstance(prior, list) else []
                late.append(
                    {
                        "kind": kind,
                        "attempt_id": att.attempt_id,
                        "gateway": att.gateway.name,
                        "status": status,
                    }
                )
                record["late_results"] = late
                await self.log.put(record)
            except Exception:
                logger.exception(
                    "could not record a late result of %s", dispatch.req.transaction_id
                )

        spawn(update(), name=f"txn-late:{dispatch.req.transaction_id[:16]}")

    def _count(self, plan: RoutePlan, result: str) -> None:
        self.metrics.idempotency.labels(plan.name, result).inc()


async def _always_up() -> None:
    return None


def transaction_record(
    dispatch: Dispatch, state: str, status: int | None, started_wall: float
) -> dict[str, object]:
    winner = dispatch.winner
    req = dispatch.req
    tried = dispatch.tried
    # Most payments leave nothing tried behind; only then is a lookup table worth building
    # (reversed, so the first entry for an attempt wins, as a scan would find it).
    left = {t.attempt_id: t.outcome for t in reversed(tried)} if tried else {}
    return {
        "transaction_id": req.transaction_id,
        "state": state,
        "route": req.plan.name,
        "region": req.region,
        "method": req.method,
        "path": req.path_qs,
        "status": status,
        "gateway": winner.gateway.name if winner else None,
        "attempts": [
            {
                "attempt_id": a.attempt_id,
                "gateway": a.gateway.name,
                "provider": a.gateway.provider,
                "abandoned": a.abandoned,
                "outcome": left.get(a.attempt_id, "answered"),
            }
            for a in dispatch.attempts
        ],
        "started_at": started_wall,
        "updated_at": time.time(),
    }
