"""What to do after one attempt ended: the payment-safety rules of DESIGN.md §5 as a function.

Owns: `decide(policy, method, has_key, history, ended) -> Verdict`, the only place that says
whether a request may go to another gateway, which gateways, and whether an attempt uses up
one of the route's `attempts`. Rules:

- an attempt that provably processed nothing (no byte reached the gateway, a 429, or a
  status the route lists as not processed) never counts against `attempts` and may go to
  any allowed gateway;
- after an ambiguous attempt (it may have been processed; no definitive answer) a
  non-idempotent request is resent only as `after_ambiguous` allows: `never` stops,
  `same-provider` (with a key the provider dedupes by) stays within that provider from then
  on, `any-gateway` goes anywhere;
- a definitive answer is answered.

Must not: do I/O, read a clock, choose a gateway (the balancer does) or hold state; every
input is a small immutable value so the whole table can be tested.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from proxy.config.model import IDEMPOTENT_METHODS, RetryPolicy
from proxy.upstream.state import Outcome


class Step(enum.Enum):
    ANSWER = "answer"  # this attempt's answer is definitive: send it to the client
    RETRY_ANYWHERE = "retry_anywhere"
    RETRY_WITHIN_PROVIDER = "retry_within_provider"
    STOP_UNKNOWN = "stop_unknown"  # no more attempts; a payment may have been taken
    STOP_FAILED = "stop_failed"  # no more attempts; nothing was processed (or idempotent)


@dataclass(frozen=True, slots=True)
class Verdict:
    step: Step
    counts: bool  # did the attempt use up one of the route's `attempts`?
    provider: str | None = None  # for RETRY_WITHIN_PROVIDER: the only provider allowed


@dataclass(frozen=True, slots=True)
class Past:
    """An earlier attempt of the same payment as the policy needs to know it."""

    provider: str
    counted: bool  # used up one of `attempts`
    ambiguous: bool  # may have been processed, no definitive answer


@dataclass(frozen=True, slots=True)
class Ended:
    """How the attempt being judged ended."""

    provider: str
    outcome: Outcome
    reached: bool  # could any byte of the request have reached the gateway?
    status: int | None = None  # the gateway's status when it answered


def unsent(policy: RetryPolicy, ended: Ended) -> bool:
    """Did the attempt provably process nothing?"""
    status = ended.status
    if status is None:
        return not ended.reached
    return status == 429 or status in policy.not_processed


def definitive(policy: RetryPolicy, status: int) -> bool:
    """Is a gateway's answer with `status` one to give the client rather than retry?"""
    return status != 429 and status not in policy.on_statuses and status not in policy.not_processed


def enabled(policy: RetryPolicy, ended: Ended) -> bool:
    """Does the route retry an ambiguous failure of this kind at all?"""
    outcome = ended.outcome
    if ended.status is not None:
        return ended.status in policy.on_statuses
    if outcome is Outcome.TIMEOUT:
        return policy.on_timeout
    if outcome in (Outcome.RESET, Outcome.BAD_RESPONSE):
        return policy.on_reset
    return policy.on_connect_failure  # a connect failure that may have sent: never in practice


def provider_lock(policy: RetryPolicy, method: str, history: Sequence[Past]) -> str | None:
    """The provider a non-idempotent request is held to once it may have been processed.

    Under `any-gateway` the team accepted the risk: no lock. Under `never` and
    `same-provider` the first ambiguous attempt's provider is the only one that can dedupe.
    """
    if method in IDEMPOTENT_METHODS or policy.after_ambiguous == "any-gateway":
        return None
    for past in history:
        if past.ambiguous:
            return past.provider
    return None


def decide(
    policy: RetryPolicy, method: str, has_key: bool, history: Sequence[Past], ended: Ended
) -> Verdict:
    """The next action after `ended`, given the attempts before it (oldest first)."""
    status = ended.status
    if status is not None and definitive(policy, status):
        return Verdict(Step.ANSWER, counts=True)
    idempotent = method in IDEMPOTENT_METHODS
    used = sum(1 for p in history if p.counted)
    lock = provider_lock(policy, method, history)
    if unsent(policy, ended):
        if used < policy.attempts:
            return _retry(lock, counts=False)
        return _stop(idempotent, any(p.ambiguous for p in history), counts=False)
    if not enabled(policy, ended) or used + 1 >= policy.attempts:
        return _stop(idempotent, True, counts=True)
    if idempotent or policy.after_ambiguous == "any-gateway":
        return _retry(lock, counts=True)
    if policy.after_ambiguous == "same-provider" and has_key:
        # The provider recognises the forwarded key as the same payment; no other can.
        return _retry(lock or ended.provider, counts=True)
    return _stop(idempotent, True, counts=True)


def _retry(lock: str | None, *, counts: bool) -> Verdict:
    if lock is None:
        return Verdict(Step.RETRY_ANYWHERE, counts=counts)
    return Verdict(Step.RETRY_WITHIN_PROVIDER, counts=counts, provider=lock)


def _stop(idempotent: bool, maybe_processed: bool, *, counts: bool) -> Verdict:
    step = Step.STOP_UNKNOWN if maybe_processed and not idempotent else Step.STOP_FAILED
    return Verdict(step, counts=counts)
