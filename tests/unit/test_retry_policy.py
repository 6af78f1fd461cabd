"""Tests for proxy.retry_policy: the whole table of first verdicts, the history rules, and
the payment-safety invariants as properties over any sequence of attempts."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import RetryPolicy
from proxy.retry_policy import Ended, Past, Step, Verdict, decide, definitive, unsent
from proxy.upstream.state import Outcome

POLICY = RetryPolicy(
    attempts=3,
    on_timeout=True,
    on_reset=True,
    on_statuses=frozenset({503}),
    not_processed=frozenset({520}),
)

#: How the attempt being judged ended, by the class of fact it establishes.
ENDINGS: dict[str, tuple[str, Ended]] = {
    "connect-refused": ("unsent", Ended("stripe", Outcome.CONNECT_FAILURE, reached=False)),
    "timer-while-connecting": ("unsent", Ended("stripe", Outcome.TIMEOUT, reached=False)),
    "429": ("unsent", Ended("stripe", Outcome.THROTTLED, reached=True, status=429)),
    "not-processed-520": ("unsent", Ended("stripe", Outcome.SERVER_ERROR, True, status=520)),
    "timeout-after-send": ("ambiguous", Ended("stripe", Outcome.TIMEOUT, reached=True)),
    "reset-after-send": ("ambiguous", Ended("stripe", Outcome.RESET, reached=True)),
    "bad-response": ("ambiguous", Ended("stripe", Outcome.BAD_RESPONSE, reached=True)),
    "503-listed": ("ambiguous", Ended("stripe", Outcome.SERVER_ERROR, True, status=503)),
    "200": ("definitive", Ended("stripe", Outcome.SUCCESS, reached=True, status=200)),
    "402": ("definitive", Ended("stripe", Outcome.SUCCESS, reached=True, status=402)),
    "500-not-listed": ("definitive", Ended("stripe", Outcome.SERVER_ERROR, True, status=500)),
}
METHODS = ("GET", "PUT", "DELETE", "POST", "PATCH")
AFTER = ("never", "same-provider", "any-gateway")

RETRY_ANY = Verdict(Step.RETRY_ANYWHERE, counts=True)
WITHIN_STRIPE = Verdict(Step.RETRY_WITHIN_PROVIDER, counts=True, provider="stripe")
UNKNOWN = Verdict(Step.STOP_UNKNOWN, counts=True)

#: First verdict after an ambiguous failure of a non-idempotent request, by
#: (after_ambiguous, key present).
AMBIGUOUS_PAYMENT = {
    ("never", False): UNKNOWN,
    ("never", True): UNKNOWN,
    ("same-provider", False): UNKNOWN,  # no key: the provider cannot dedupe a resend
    ("same-provider", True): WITHIN_STRIPE,
    ("any-gateway", False): RETRY_ANY,
    ("any-gateway", True): RETRY_ANY,
}


def expected_first(kind: str, method: str, after: str, key: bool) -> Verdict:
    if kind == "definitive":
        return Verdict(Step.ANSWER, counts=True)
    if kind == "unsent":
        return Verdict(Step.RETRY_ANYWHERE, counts=False)
    if method in ("GET", "PUT", "DELETE"):
        return RETRY_ANY
    return AMBIGUOUS_PAYMENT[(after, key)]


TABLE = list(itertools.product(ENDINGS, METHODS, AFTER, (False, True)))


@pytest.mark.parametrize(
    ("ending", "method", "after", "key"),
    TABLE,
    ids=[f"{e}-{m}-{a}-{'key' if k else 'nokey'}" for e, m, a, k in TABLE],
)
def test_first_attempt_verdict_over_the_whole_table(
    ending: str, method: str, after: str, key: bool
) -> None:
    kind, ended = ENDINGS[ending]
    policy = RetryPolicy(
        attempts=POLICY.attempts,
        on_timeout=True,
        on_reset=True,
        on_statuses=POLICY.on_statuses,
        not_processed=POLICY.not_processed,
        after_ambiguous=after,  # type: ignore[arg-type]
    )
    assert decide(policy, method, key, (), ended) == expected_first(kind, method, after, key)


SAME = RetryPolicy(
    attempts=3,
    on_timeout=True,
    on_reset=True,
    on_statuses=frozenset({503}),
    after_ambiguous="same-provider",
)
TIMEOUT_SENT = Ended("stripe", Outcome.TIMEOUT, reached=True)
REFUSED_ADYEN = Ended("adyen", Outcome.CONNECT_FAILURE, reached=False)


@pytest.mark.parametrize(
    ("policy", "method", "history", "ended", "expected"),
    [
        pytest.param(
            SAME,
            "POST",
            (Past("stripe", counted=True, ambiguous=True),),
            REFUSED_ADYEN,
            Verdict(Step.RETRY_WITHIN_PROVIDER, counts=False, provider="stripe"),
            id="unsent-after-a-sent-attempt-stays-within-its-provider",
        ),
        pytest.param(
            SAME,
            "POST",
            (Past("stripe", True, True), Past("stripe", True, True)),
            TIMEOUT_SENT,
            UNKNOWN,
            id="attempts-used-up-payment-is-unknown",
        ),
        pytest.param(
            SAME,
            "GET",
            (Past("stripe", True, True), Past("stripe", True, True)),
            TIMEOUT_SENT,
            Verdict(Step.STOP_FAILED, counts=True),
            id="attempts-used-up-idempotent-fails",
        ),
        pytest.param(
            SAME,
            "POST",
            (Past("a", False, False),) * 5,
            TIMEOUT_SENT,
            WITHIN_STRIPE,
            id="unsent-attempts-use-up-nothing",
        ),
        pytest.param(
            RetryPolicy(attempts=2, after_ambiguous="same-provider"),
            "POST",
            (Past("stripe", True, True), Past("stripe", True, False)),
            REFUSED_ADYEN,
            Verdict(Step.STOP_UNKNOWN, counts=False),
            id="unsent-but-attempts-used-up-after-ambiguous-is-unknown",
        ),
        pytest.param(
            RetryPolicy(attempts=1),
            "POST",
            (Past("stripe", True, False),),
            REFUSED_ADYEN,
            Verdict(Step.STOP_FAILED, counts=False),
            id="unsent-and-nothing-ambiguous-fails",
        ),
        pytest.param(
            RetryPolicy(attempts=3, on_timeout=False, after_ambiguous="any-gateway"),
            "POST",
            (),
            TIMEOUT_SENT,
            UNKNOWN,
            id="timeouts-not-retried-by-the-route",
        ),
        pytest.param(
            RetryPolicy(attempts=3, on_reset=False),
            "GET",
            (),
            Ended("stripe", Outcome.RESET, reached=True),
            Verdict(Step.STOP_FAILED, counts=True),
            id="resets-not-retried-by-the-route",
        ),
        pytest.param(
            RetryPolicy(attempts=3, on_connect_failure=False),
            "GET",
            (),
            Ended("stripe", Outcome.CONNECT_FAILURE, reached=True),
            Verdict(Step.STOP_FAILED, counts=True),
            id="connect-failure-that-may-have-sent",
        ),
        pytest.param(
            SAME,
            "POST",
            (Past("adyen", counted=False, ambiguous=True),),
            TIMEOUT_SENT,
            Verdict(Step.RETRY_WITHIN_PROVIDER, counts=True, provider="adyen"),
            id="an-earlier-holder-pins-the-provider",
        ),
        pytest.param(
            RetryPolicy(attempts=3, after_ambiguous="never"),
            "POST",
            (Past("adyen", counted=False, ambiguous=True),),
            REFUSED_ADYEN,
            Verdict(Step.RETRY_WITHIN_PROVIDER, counts=False, provider="adyen"),
            id="never-still-keeps-an-unsent-retry-within-the-earlier-provider",
        ),
        pytest.param(
            RetryPolicy(attempts=3, after_ambiguous="any-gateway"),
            "POST",
            (Past("adyen", counted=True, ambiguous=True),),
            REFUSED_ADYEN,
            Verdict(Step.RETRY_ANYWHERE, counts=False),
            id="any-gateway-never-locks",
        ),
    ],
)
def test_verdicts_with_history(
    policy: RetryPolicy, method: str, history: tuple[Past, ...], ended: Ended, expected: Verdict
) -> None:
    assert decide(policy, method, True, history, ended) == expected


# -- properties ---------------------------------------------------------------------------

PROVIDERS = ("stripe", "adyen", "braintree")
STATUSES = (200, 201, 400, 402, 409, 429, 500, 502, 503, 504, 520)

policies = st.builds(
    RetryPolicy,
    attempts=st.integers(1, 5),
    on_connect_failure=st.booleans(),
    on_timeout=st.booleans(),
    on_reset=st.booleans(),
    on_statuses=st.frozensets(st.sampled_from((500, 502, 503, 504))),
    not_processed=st.frozensets(st.sampled_from((502, 520))),
    after_ambiguous=st.sampled_from(AFTER),
)
failures = st.builds(
    Ended,
    provider=st.sampled_from(PROVIDERS),
    outcome=st.sampled_from(
        (Outcome.CONNECT_FAILURE, Outcome.TIMEOUT, Outcome.RESET, Outcome.BAD_RESPONSE)
    ),
    reached=st.booleans(),
)
answers = st.builds(
    lambda provider, status: Ended(provider, Outcome.SUCCESS, True, status),
    st.sampled_from(PROVIDERS),
    st.sampled_from(STATUSES),
)
endings = st.one_of(failures, answers)
pasts = st.builds(Past, st.sampled_from(PROVIDERS), st.booleans(), st.booleans())


def run(
    policy: RetryPolicy, method: str, key: bool, ends: list[Ended]
) -> list[tuple[Ended, Verdict]]:
    """Feed attempts' ends to the policy as the mechanism does, until it stops."""
    history: list[Past] = []
    seen: list[tuple[Ended, Verdict]] = []
    for ended in ends:
        verdict = decide(policy, method, key, tuple(history), ended)
        seen.append((ended, verdict))
        if verdict.step not in (Step.RETRY_ANYWHERE, Step.RETRY_WITHIN_PROVIDER):
            break
        history.append(Past(ended.provider, verdict.counts, ambiguous=verdict.counts))
    return seen


@settings(max_examples=400, deadline=None)
@given(policies, st.booleans(), st.lists(endings, min_size=1, max_size=8))
def test_never_another_provider_after_a_sent_attempt_under_same_provider(
    policy: RetryPolicy, key: bool, ends: list[Ended]
) -> None:
    policy = RetryPolicy(
        attempts=policy.attempts,
        on_timeout=policy.on_timeout,
        on_reset=policy.on_reset,
        on_statuses=policy.on_statuses,
        not_processed=policy.not_processed,
        after_ambiguous="same-provider",
    )
    locked: str | None = None
    for ended, verdict in run(policy, "POST", key, ends):
        if locked is not None and verdict.step is not Step.ANSWER:
            assert verdict.step is not Step.RETRY_ANYWHERE
            if verdict.step is Step.RETRY_WITHIN_PROVIDER:
                assert verdict.provider == locked
        if locked is None and verdict.counts and verdict.step is not Step.ANSWER:
            locked = ended.provider


@settings(max_examples=400, deadline=None)
@given(policies, st.booleans(), st.sampled_from(("POST", "PATCH")), st.lists(endings, min_size=1))
def test_never_a_resend_of_a_payment_under_never(
    policy: RetryPolicy, key: bool, method: str, ends: list[Ended]
) -> None:
    policy = RetryPolicy(
        attempts=policy.attempts,
        on_timeout=policy.on_timeout,
        on_reset=policy.on_reset,
        on_statuses=policy.on_statuses,
        not_processed=policy.not_processed,
        after_ambiguous="never",
    )
    for ended, verdict in run(policy, method, key, ends):
        if unsent(policy, ended) or (ended.status and definitive(policy, ended.status)):
            continue
        assert verdict.step in (Step.STOP_UNKNOWN, Step.STOP_FAILED), "a sent payment was resent"


@settings(max_examples=400, deadline=None)
@given(policies, st.sampled_from(METHODS), st.booleans(), st.lists(pasts, max_size=6), endings)
def test_a_provably_unsent_attempt_never_counts(
    policy: RetryPolicy, method: str, key: bool, history: list[Past], ended: Ended
) -> None:
    verdict = decide(policy, method, key, tuple(history), ended)
    if unsent(policy, ended):
        assert not verdict.counts
        assert verdict.step is not Step.ANSWER or ended.status is not None
    if not ended.reached and ended.status is None:
        assert verdict.step is not Step.STOP_UNKNOWN or any(p.ambiguous for p in history)


@settings(max_examples=300, deadline=None)
@given(policies, st.sampled_from(METHODS), st.booleans(), st.lists(endings, min_size=1))
def test_attempts_bound_what_gateways_may_have_processed(
    policy: RetryPolicy, method: str, key: bool, ends: list[Ended]
) -> None:
    counted = sum(1 for _, v in run(policy, method, key, ends) if v.counts)
    assert counted <= policy.attempts
