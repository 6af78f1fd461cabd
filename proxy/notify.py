"""The webhook notifier: events an on-call human must hear about, POSTed as JSON.

Owns: `WebhookSink`, an event sink that POSTs each event (at or above its `min_severity`)
to one URL, retrying with capped exponential back-off and full jitter, a bounded number of
times.
Must not: slow the emitter. Its buffer is bounded; when the receiver is down long enough for
it to fill, new events are dropped and counted (`payswitch_events_dropped_total{sink}`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable, Mapping, Sequence

import aiohttp
import orjson

from proxy.events import Event, QueuedSink, Severity, encode

logger = logging.getLogger(__name__)

#: Answers worth another try: the receiver may be overloaded or restarting. Any other 4xx
#: means the request itself is wrong, and sending it again would not help.
RETRY_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})

Sleep = Callable[[float], Awaitable[None]]


def alertmanager_body(event: Event) -> bytes:
    """The event as one alert for Alertmanager's `POST /api/v2/alerts`.

    Labels carry what routing and silencing key on (kind, severity, gateway, route);
    the whole event rides in an annotation so a receiver template can show it.
    """
    labels = {
        "alertname": f"payswitch_{event.kind.replace('.', '_')}",
        "severity": event.severity.name.lower(),
    }
    for key in ("gateway", "route", "region"):
        value = event.fields.get(key)
        if isinstance(value, str):
            labels[key] = value
    summary = f"{event.kind}: " + ", ".join(
        f"{k}={event.fields[k]}" for k in ("gateway", "route") if k in event.fields
    )
    return orjson.dumps(
        [
            {
                "labels": labels,
                "annotations": {
                    "summary": summary,
                    "event": encode(event).decode(),
                    "event_id": event.id,
                },
                "startsAt": event.time,
            }
        ]
    )


#: Body formats: the event itself (for chat/SMS/email bridges and log shippers), or an
#: Alertmanager alert list so Alertmanager's routing and silences apply.
FORMATS: dict[str, Callable[[Event], bytes]] = {"event": encode, "alertmanager": alertmanager_body}


class WebhookSink(QueuedSink):
    """POSTs events one by one; delivery order follows emission order.

    Each POST carries `X-Payswitch-Event-Id` so a receiver can dedupe a delivery that was
    retried after its first answer was lost.
    """

    def __init__(
        self,
        url: str,
        *,
        name: str = "webhook",
        min_severity: Severity = Severity.ERROR,
        capacity: int = 1000,
        attempts: int = 5,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
        request_timeout: float = 5.0,
        headers: Mapping[str, str] | None = None,
        session: aiohttp.ClientSession | None = None,
        rng: random.Random | None = None,
        sleep: Sleep = asyncio.sleep,
        body_format: str = "event",
    ) -> None:
        if body_format not in FORMATS:
            raise ValueError(
                f"webhook format must be one of {', '.join(FORMATS)}, not {body_format!r}"
            )
        if attempts < 1:
            raise ValueError("attempts must be at least 1")
        if backoff_base < 0 or backoff_max < backoff_base:
            raise ValueError("need 0 <= backoff_base <= backoff_max")
        super().__init__(name=name, min_severity=min_severity, capacity=capacity)
        self.url = url
        self.attempts = attempts
        self.backoff_base = backoff_base
        self.backoff_max = backoff_max
        self.request_timeout = request_timeout
        self.headers = dict(headers or {})
        self._session = session
        self._owns_session = session is None
        self._rng = rng or random.Random()
        self._sleep = sleep
        self._encode = FORMATS[body_format]

    def backoff(self, retry: int) -> float:
        """Delay before retry number `retry` (1-based): full jitter over a capped doubling."""
        ceiling = min(self.backoff_max, self.backoff_base * 2 ** (retry - 1))
        return self._rng.uniform(0, ceiling)

    async def start(self) -> None:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(total=self.request_timeout)
            )
            self._owns_session = True
        await super().start()

    async def deliver(self, batch: Sequence[Event]) -> None:
        for event in batch:
            if await self._post(event):
                self.delivered += 1
            else:
                self.drop(1, f"{event.kind} {event.id} not delivered to {self.url}")

    async def _post(self, event: Event) -> bool:
        session = self._session
        assert session is not None, "deliver runs only after start"
        body = self._encode(event)
        headers = {
            **self.headers,
            "Content-Type": "application/json",
            "X-Payswitch-Event-Id": event.id,
        }
        last = ""
        for attempt in range(1, self.attempts + 1):
            if attempt > 1:
                await self._sleep(self.backoff(attempt - 1))
            try:
                async with session.post(self.url, data=body, headers=headers) as resp:
                    await resp.read()
                    if resp.status < 300:
                        return True
                    last = f"HTTP {resp.status}"
                    if resp.status not in RETRY_STATUSES:
                        break
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
        logger.warning(
            "webhook %s: giving up on %s event %s after %d attempt(s): %s",
            self.url,
            event.kind,
            event.id,
            attempt,
            last,
        )
        return False

    async def aclose_resources(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None
