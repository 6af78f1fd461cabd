"""The idempotency store replicas share: real Redis, every state change one Lua script.

Owns: `RedisIdempotencyStore`, its key layout under a prefix, and the scripts that make each
claim and each lease-checked write atomic on the server.
Must not: decide anything in Python between reading and writing a key (two sidecars would
race), or rely on client clocks; lock and record lifetimes are Redis's own PX expiries.

Layout for a store key K, both sharing the hash tag {K} so a cluster keeps them together
(the prefix must therefore contain no braces):

    <prefix>idem:{K}:r   hash   state, fp, lease, count, cause, last_gateway, attempt_id,
                                txn, and for completed keys status, headers (JSON), body
    <prefix>idem:{K}:l   string the holder's lease, SET NX PX lock_ttl

A record in state "inflight" whose lock key has expired has lost its holder; the next claim
takes it over as Unresolved. Redis must not evict these keys under memory pressure
(`maxmemory-policy noeviction`): a vanished record lets a payment be dispatched twice.
"""

from __future__ import annotations

import json
import logging
import math

from redis.asyncio import Redis

from proxy.idempotency.store import (
    Claimed,
    ClaimResult,
    Completed,
    InFlight,
    Mismatch,
    StoredResponse,
    Unresolved,
    UnresolvedCause,
    check_ttl,
    new_lease,
)

logger = logging.getLogger(__name__)

#: Seconds any one Redis connect or command may take before the call fails.
REDIS_TIMEOUT = 1.0

# KEYS: record, lock. ARGV: fingerprint, new lease, ttl ms, lock ms.
_CLAIM = """
local rec, lock = KEYS[1], KEYS[2]
local fp, lease = ARGV[1], ARGV[2]
local keep_ms = math.max(tonumber(ARGV[3]), tonumber(ARGV[4]))
local f = redis.call('HMGET', rec, 'state', 'fp', 'status', 'headers', 'body', 'gateway',
                     'txn', 'last_gateway', 'attempt_id', 'count', 'cause')
local state = f[1]
if not state then
  if not redis.call('SET', lock, lease, 'NX', 'PX', ARGV[4]) then
    return {'inflight', redis.call('PTTL', lock)}
  end
  redis.call('HSET', rec, 'state', 'inflight', 'fp', fp, 'lease', lease)
  redis.call('PEXPIRE', rec, keep_ms)
  return {'claimed'}
end
if f[2] ~= fp then
  return {'mismatch'}
end
if state == 'completed' then
  return {'completed', f[3], f[4], f[5], f[6], f[7]}
end
local count = tonumber(f[10] or '0')
local cause = f[11] or 'unknown'
if state == 'inflight' then
  local left = redis.call('PTTL', lock)
  if left ~= -2 then
    return {'inflight', left}
  end
  count = count + 1
  cause = 'lock_expired'
end
redis.call('SET', lock, lease, 'PX', ARGV[4])
redis.call('HSET', rec, 'state', 'inflight', 'lease', lease, 'count', count, 'cause', cause)
redis.call('PEXPIRE', rec, keep_ms)
return {'unresolved', cause, f[8] or '', f[9] or '', f[7] or '', count}
"""

# Every lease-checked write starts with this: the record must be in flight under ARGV[1].
_HELD = """
local rec, lock, lease = KEYS[1], KEYS[2], ARGV[1]
local h = redis.call('HMGET', rec, 'state', 'lease')
if h[1] ~= 'inflight' or h[2] ~= lease then
  return 0
end
if redis.call('GET', lock) == lease then
  redis.call('DEL', lock)
end
"""

# ARGV: lease, gateway, attempt id, transaction id or ''.
_RECORD_ATTEMPT = """
local rec, lease = KEYS[1], ARGV[1]
local h = redis.call('HMGET', rec, 'state', 'lease')
if h[1] ~= 'inflight' or h[2] ~= lease then
  return 0
end
redis.call('HSET', rec, 'last_gateway', ARGV[2], 'attempt_id', ARGV[3])
if ARGV[4] ~= '' then
  redis.call('HSET', rec, 'txn', ARGV[4])
end
return 1
"""

# ARGV: lease, status, headers JSON, body, gateway, transaction id, ttl ms.
_COMPLETE = (
    _HELD
    + """
redis.call('HDEL', rec, 'lease')
redis.call('HSET', rec, 'state', 'completed', 'status', ARGV[2], 'headers', ARGV[3],
           'body', ARGV[4], 'gateway', ARGV[5], 'txn', ARGV[6], 'last_gateway', ARGV[5])
redis.call('PEXPIRE', rec, ARGV[7])
return 1
"""
)

# ARGV: lease, gateway, attempt id, ttl ms, transaction id or ''.
_MARK_UNKNOWN = (
    _HELD
    + """
redis.call('HDEL', rec, 'lease')
redis.call('HSET', rec, 'state', 'unresolved', 'cause', 'unknown',
           'last_gateway', ARGV[2], 'attempt_id', ARGV[3])
redis.call('HINCRBY', rec, 'count', 1)
if ARGV[5] ~= '' then
  redis.call('HSET', rec, 'txn', ARGV[5])
end
redis.call('PEXPIRE', rec, ARGV[4])
return 1
"""
)

# ARGV: lease. An earlier unknown outcome survives a holder that sent nothing.
_RELEASE = (
    _HELD
    + """
if tonumber(redis.call('HGET', rec, 'count') or '0') > 0 then
  redis.call('HDEL', rec, 'lease')
  redis.call('HSET', rec, 'state', 'unresolved')
else
  redis.call('DEL', rec)
end
return 1
"""
)


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _optional(value: object) -> str | None:
    text = _text(value)
    return text or None


class RedisIdempotencyStore:
    """`IdempotencyStore` on a Redis server shared by every replica."""

    def __init__(
        self,
        client: Redis,
        *,
        prefix: str,
        default_lock_ttl: float = 60.0,
        owns_client: bool = False,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the key prefix must not contain braces; they are the hash tag")
        self._client = client
        self._prefix = prefix
        self._default_lock_ttl = check_ttl("default_lock_ttl", default_lock_ttl)
        self._owns_client = owns_client
        self._claim = client.register_script(_CLAIM)
        self._record_attempt = client.register_script(_RECORD_ATTEMPT)
        self._complete = client.register_script(_COMPLETE)
        self._mark_unknown = client.register_script(_MARK_UNKNOWN)
        self._release = client.register_script(_RELEASE)

    @classmethod
    def from_url(
        cls, url: str, prefix: str, *, default_lock_ttl: float = 60.0
    ) -> RedisIdempotencyStore:
        """A store with its own connection pool to `url`, closed by `close()`.

        Every call is bounded (`REDIS_TIMEOUT`): a Redis that stops answering without closing
        its connections must fail the claim quickly, not hold the payment until the client
        gives up."""
        client = Redis.from_url(
            url,
            decode_responses=False,
            socket_connect_timeout=REDIS_TIMEOUT,
            socket_timeout=REDIS_TIMEOUT,
        )
        return cls(client, prefix=prefix, default_lock_ttl=default_lock_ttl, owns_client=True)

    def _keys(self, key: str) -> list[str]:
        base = f"{self._prefix}idem:{{{key}}}"
        return [f"{base}:r", f"{base}:l"]

    async def claim(
        self, key: str, fingerprint: str, ttl: float, *, lock_ttl: float | None = None
    ) -> ClaimResult:
        check_ttl("ttl", ttl)
        lock = check_ttl("lock_ttl", self._default_lock_ttl if lock_ttl is None else lock_ttl)
        lease = new_lease()
        reply = await self._claim(
            keys=self._keys(key), args=[fingerprint, lease, _ms(ttl), _ms(lock)]
        )
        kind = _text(reply[0])
        if kind == "claimed":
            return Claimed(lease=lease)
        if kind == "mismatch":
            return Mismatch()
        if kind == "inflight":
            return InFlight(retry_after=max(0, int(reply[1])) / 1000)
        if kind == "completed":
            status, headers, body, gateway, txn = reply[1:6]
            return Completed(
                response=StoredResponse(
                    status=int(status),
                    headers=tuple((str(n), str(v)) for n, v in json.loads(headers)),
                    body=bytes(body),
                    gateway=_text(gateway),
                    transaction_id=_text(txn),
                )
            )
        if kind == "unresolved":
            cause: UnresolvedCause = (
                "lock_expired" if _text(reply[1]) == "lock_expired" else "unknown"
            )
            if cause == "lock_expired":
                logger.warning(
                    "idempotency claim %r outlived its lock; its holder is presumed lost", key
                )
            return Unresolved(
                lease=lease,
                cause=cause,
                last_gateway=_optional(reply[2]),
                attempt_id=_optional(reply[3]),
                transaction_id=_optional(reply[4]),
                unresolved_count=int(reply[5]),
            )
        raise RuntimeError(f"unexpected reply from the claim script: {reply!r}")

    async def record_attempt(
        self,
        key: str,
        lease: str,
        *,
        gateway: str,
        attempt_id: str,
        transaction_id: str | None = None,
    ) -> bool:
        args = [lease, gateway, attempt_id, transaction_id or ""]
        return bool(await self._record_attempt(keys=self._keys(key)[:1], args=args))

    async def complete(self, key: str, lease: str, response: StoredResponse, ttl: float) -> bool:
        check_ttl("ttl", ttl)
        headers = json.dumps([list(pair) for pair in response.headers], ensure_ascii=False)
        args: list[str | int | bytes] = [
            lease,
            response.status,
            headers,
            response.body,
            response.gateway,
            response.transaction_id,
            _ms(ttl),
        ]
        return bool(await self._complete(keys=self._keys(key), args=args))

    async def mark_unknown(
        self,
        key: str,
        lease: str,
        gateway: str,
        attempt_id: str,
        ttl: float,
        *,
        transaction_id: str | None = None,
    ) -> bool:
        check_ttl("ttl", ttl)
        args: list[str | int] = [lease, gateway, attempt_id, _ms(ttl), transaction_id or ""]
        return bool(await self._mark_unknown(keys=self._keys(key), args=args))

    async def release(self, key: str, lease: str) -> bool:
        return bool(await self._release(keys=self._keys(key), args=[lease]))

    async def ping(self) -> None:
        await self._client.ping()

    async def close(self) -> None:
        if self._owns_client:
            await self._client.aclose()
