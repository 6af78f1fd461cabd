"""Typed errors raised deep in the request path, and the one place they become HTTP.

Owns: the exception types and `problem_response`, which renders any of them as a small
`application/problem+json` body naming the route, region and every gateway tried.
Must not: decide retries (retry.py does) or log (the access log does).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from proxy.server import Answer, problem_fields


@dataclass(frozen=True, slots=True, kw_only=True)
class Tried:
    """One gateway the request was offered to, and why it was left."""

    gateway: str
    outcome: str  # connect_failure, timeout, reset, status_503, skipped:rate-limited, ...
    attempt_id: str | None = None
    status: int | None = None


class ProxyError(Exception):
    status = 500
    title = "Internal proxy error"
    slug = "internal"

    def __init__(
        self,
        detail: str,
        *,
        route: str | None = None,
        region: str | None = None,
        tried: Sequence[Tried] = (),
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.route = route
        self.region = region
        self.tried = tuple(tried)
        self.headers = headers or {}


class BadRequest(ProxyError):
    status = 400
    title = "Bad request"
    slug = "bad-request"


class RequestTimeout(ProxyError):
    status = 408
    title = "Request timeout"
    slug = "request-timeout"


class ClientClosed(ProxyError):
    """The client went away before its request was whole; nginx's 499 in the logs."""

    status = 499
    title = "Client closed request"
    slug = "client-closed"


class NoRoute(ProxyError):
    status = 404
    title = "No route matches this request"
    slug = "no-route"


class Conflict(ProxyError):
    status = 409
    title = "A request with this idempotency key is in progress"
    slug = "idempotency-in-flight"


class BodyTooLarge(ProxyError):
    status = 413
    title = "Request body too large"
    slug = "body-too-large"


class Unprocessable(ProxyError):
    status = 422
    title = "Idempotency key reused with a different request"
    slug = "idempotency-mismatch"


class NoGatewayAvailable(ProxyError):
    status = 503
    title = "No gateway available"
    slug = "no-gateway-available"


class StoreUnavailable(ProxyError):
    """The idempotency store cannot take this payment's key now; nothing was sent."""

    status = 503
    title = "Idempotency store unavailable"
    slug = "idempotency-store-unavailable"


class UpstreamFailed(ProxyError):
    """Every attempt failed to connect or answered with something unusable."""

    status = 502
    title = "Bad gateway"
    slug = "upstream-failed"


class DeadlineExceeded(ProxyError):
    status = 504
    title = "Gateway timeout"
    slug = "deadline-exceeded"


class OutcomeUnknown(ProxyError):
    """A payment was sent and its outcome was lost: the client must not assume failure."""

    status = 504
    title = "Payment outcome unknown"
    slug = "outcome-unknown"


def problem_body(err: ProxyError, transaction_id: str | None = None) -> bytes:
    body = problem_fields(err.status, err.title, err.detail, err.slug)
    if err.route is not None:
        body["route"] = err.route
    if err.region is not None:
        body["region"] = err.region
    if err.tried:
        body["tried"] = [
            {
                k: v
                for k, v in (
                    ("gateway", t.gateway),
                    ("outcome", t.outcome),
                    ("status", t.status),
                    ("attempt_id", t.attempt_id),
                )
                if v is not None
            }
            for t in err.tried
        ]
    if transaction_id is not None:
        body["transaction_id"] = transaction_id
    return orjson.dumps(body)


def problem_response(err: ProxyError, transaction_id: str | None = None) -> Answer:
    headers = {**err.headers, "Content-Type": "application/problem+json"}
    return Answer(err.status, headers, problem_body(err, transaction_id))
