"""Redis session store: sessions shared by every worker and server that uses the same Redis.

Layout (``prefix`` defaults to ``mcp2anp:``):

- ``{prefix}s:{id}``: a hash with ``principal``, ``created_at``, ``last_used``, ``expires_at``,
  ``implicit``, ``pkey`` and, once the MCP handshake is done, ``handshake``; expires by Redis
  TTL (the TTL the registry passes: the time to the session's deadline plus the touch interval,
  so throttled writes never expire one early).
- ``{prefix}all``: a sorted set of session ids scored by TTL expiry, for counts and the global cap
  without ``KEYS``.
- ``{prefix}p:{sha256(principal)}``: the same per principal, for the per-principal cap and listing;
  its lowest score is the least recently used session, the one evicted when eviction is configured.
- ``{prefix}ended``: a pub/sub channel on which a process announces a session it removed
  (DELETE, revocation, eviction), so every other process drops its live objects at once.

Creation is one Lua script (create-if-absent, caps and index updates atomic across processes).
A read is one ``HGETALL``; a write is one script call, made by the registry at most once per
touch interval per session. Any Redis failure raises :class:`StoreUnavailable` (HTTP 503);
redis-py reconnects by itself when Redis is back. Needs a single Redis (or a primary behind
Sentinel), not Redis Cluster: scripts touch keys of several hash slots.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Self, TypeVar

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from mcp2anp_middleware.sessions.stores.base import (
    CapExceeded,
    Caps,
    CreateOutcome,
    SessionRecord,
    StoreUnavailable,
)

T = TypeVar("T")

_FIELDS = ("principal", "created_at", "last_used", "expires_at", "implicit")

_CREATE = """
local skey, allkey, pkey = KEYS[1], KEYS[2], KEYS[3]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local global_cap, principal_cap, evict = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local session_prefix = ARGV[7]
if redis.call('EXISTS', skey) == 1 then return {'exists'} end
redis.call('ZREMRANGEBYSCORE', allkey, '-inf', now)
redis.call('ZREMRANGEBYSCORE', pkey, '-inf', now)
local at_cap = principal_cap > 0 and redis.call('ZCARD', pkey) >= principal_cap
if at_cap and evict ~= '1' then return {'principal'} end
local total_after = redis.call('ZCARD', allkey)
if at_cap then total_after = total_after - 1 end
if global_cap > 0 and total_after >= global_cap then return {'global'} end
local result = {'ok'}
if at_cap then
  local victim = redis.call('ZRANGE', pkey, 0, 0)[1]
  local vkey = session_prefix .. victim
  result = {'ok', victim, unpack(redis.call('HMGET', vkey, unpack(ARGV, 13, 17)))}
  redis.call('DEL', vkey)
  redis.call('ZREM', allkey, victim)
  redis.call('ZREM', pkey, victim)
end
redis.call('HSET', skey, 'principal', ARGV[8], 'created_at', ARGV[9], 'last_used', ARGV[10],
           'expires_at', ARGV[11], 'implicit', ARGV[12], 'pkey', pkey)
if ARGV[18] ~= '' then redis.call('HSET', skey, 'handshake', ARGV[18]) end
redis.call('PEXPIRE', skey, ttl_ms)
local expires = now + ttl_ms / 1000
redis.call('ZADD', allkey, expires, sid)
redis.call('ZADD', pkey, expires, sid)
if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
return result
"""

_WRITE = """
local skey, allkey = KEYS[1], KEYS[2]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HGET', skey, 'created_at') ~= ARGV[4] then return 0 end
local pkey = redis.call('HGET', skey, 'pkey')
redis.call('HSET', skey, 'last_used', ARGV[5], 'expires_at', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', skey, 'handshake', ARGV[7]) end
redis.call('PEXPIRE', skey, ttl_ms)
local expires = now + ttl_ms / 1000
redis.call('ZADD', allkey, expires, sid)
if pkey then
  redis.call('ZADD', pkey, expires, sid)
  if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
end
return 1
"""

_REMOVE = """
local skey, allkey = KEYS[1], KEYS[2]
local sid, fence = ARGV[1], ARGV[2]
if fence ~= '' and redis.call('HGET', skey, 'created_at') ~= fence then return 0 end
local pkey = redis.call('HGET', skey, 'pkey')
local deleted = redis.call('DEL', skey)
redis.call('ZREM', allkey, sid)
if pkey then redis.call('ZREM', pkey, sid) end
return deleted
"""


class RedisSessionStore:
    def __init__(
        self,
        client: aioredis.Redis,
        *,
        prefix: str = "mcp2anp:",
        touch_interval: float = 30.0,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.default_touch_interval = touch_interval
        self._all_key = f"{prefix}all"
        self._session_prefix = f"{prefix}s:"
        self.ended_channel = f"{prefix}ended"
        self._create = client.register_script(_CREATE)
        self._write = client.register_script(_WRITE)
        self._remove = client.register_script(_REMOVE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "mcp2anp:",
        touch_interval: float = 30.0,
        timeout: float = 2.0,
    ) -> Self:
        client = aioredis.Redis.from_url(
            url,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            health_check_interval=15,
            decode_responses=True,
        )
        return cls(client, prefix=prefix, touch_interval=touch_interval)

    def _session_key(self, session_id: str) -> str:
        return self._session_prefix + session_id

    def _principal_key(self, principal: str) -> str:
        return f"{self.prefix}p:{hashlib.sha256(principal.encode()).hexdigest()[:32]}"

    async def create(
        self, record: SessionRecord, *, ttl: float, now: float, caps: Caps
    ) -> CreateOutcome:
        keys = [
            self._session_key(record.session_id),
            self._all_key,
            self._principal_key(record.principal),
        ]
        args: list[str | int] = [
            record.session_id,
            repr(now),
            _milliseconds(ttl),
            caps.global_limit or 0,
            caps.per_principal or 0,
            "1" if caps.evict_oldest else "0",
            self._session_prefix,
            *_values(record),
            *_FIELDS,
            record.handshake or "",
        ]
        reply = [_text(part) for part in await _guard(lambda: self._create(keys=keys, args=args))]
        status = reply[0]
        if status == "exists":
            return CreateOutcome(created=False)
        if status == "principal":
            raise CapExceeded("principal", caps.per_principal or 0)
        if status == "global":
            raise CapExceeded("global", caps.global_limit or 0)
        evicted = (
            _record(reply[1], dict(zip(_FIELDS, reply[2:], strict=False)))
            if len(reply) > 1
            else None
        )
        return CreateOutcome(created=True, evicted=(evicted,) if evicted else ())

    async def read(self, session_id: str) -> SessionRecord | None:
        raw = await _guard(lambda: self.client.hgetall(self._session_key(session_id)))
        return _record(session_id, {_text(k): _text(v) for k, v in raw.items()})

    async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        keys = [self._session_key(record.session_id), self._all_key]
        args: list[str | int] = [
            record.session_id,
            repr(now),
            _milliseconds(ttl),
            repr(float(record.created_at)),
            repr(record.last_used),
            repr(record.expires_at),
            record.handshake or "",
        ]
        return bool(await _guard(lambda: self._write(keys=keys, args=args)))

    async def remove(self, session_id: str, *, created_at: float | None = None) -> bool:
        keys = [self._session_key(session_id), self._all_key]
        args = [session_id, "" if created_at is None else repr(float(created_at))]
        return bool(await _guard(lambda: self._remove(keys=keys, args=args)))

    async def principal_sessions(
        self, principal: str | None, *, now: float, limit: int | None = None
    ) -> list[SessionRecord]:
        key = self._all_key if principal is None else self._principal_key(principal)
        start, num = (None, None) if limit is None else (0, limit)

        async def ranked() -> list[object]:
            found = await self.client.zrangebyscore(key, f"({now}", "+inf", start=start, num=num)
            return list(found)

        ids = [_text(i) for i in await _guard(ranked)]
        if not ids:
            return []

        async def fetch() -> list[dict[str, str]]:
            async with self.client.pipeline(transaction=False) as pipe:
                for session_id in ids:
                    pipe.hgetall(self._session_key(session_id))
                replies = await pipe.execute()
            return [{_text(k): _text(v) for k, v in reply.items()} for reply in replies]

        records = [_record(i, fields) for i, fields in zip(ids, await _guard(fetch), strict=True)]
        return [r for r in records if r is not None and principal in (None, r.principal)]

    async def count(self, *, now: float) -> int:
        return int(await _guard(lambda: self.client.zcount(self._all_key, f"({now}", "+inf")))

    async def expire(self, *, now: float) -> list[SessionRecord]:
        await _guard(lambda: self.client.zremrangebyscore(self._all_key, "-inf", now))
        return []  # Redis expires the sessions themselves (TTL)

    async def announce_ended(self, notice: str) -> None:
        """Tell every process that a session ended here (``kind:id``; best effort: the record is
        gone already, so a process that misses this still refuses the id at its next lookup)."""
        await _guard(lambda: self.client.publish(self.ended_channel, notice))

    async def ended_sessions(self) -> AsyncIterator[str]:
        """The notices processes announced, for as long as the caller keeps iterating."""
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await _guard(lambda: pubsub.subscribe(self.ended_channel))
            while True:
                message = await _guard(lambda: pubsub.get_message(timeout=5.0))
                if message is not None and message.get("type") == "message":
                    yield _text(message["data"])
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]  # redis-py leaves it untyped

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self.client.aclose()


def _values(record: SessionRecord) -> list[str]:
    return [
        record.principal,
        repr(float(record.created_at)),
        repr(record.last_used),
        repr(record.expires_at),
        "1" if record.implicit else "0",
    ]


def _record(session_id: str, fields: dict[str, str]) -> SessionRecord | None:
    if not fields:
        return None
    try:
        return SessionRecord(
            session_id=session_id,
            principal=fields["principal"],
            created_at=float(fields["created_at"]),
            last_used=float(fields["last_used"]),
            expires_at=float(fields["expires_at"]),
            implicit=fields.get("implicit") == "1",
            handshake=fields.get("handshake") or None,
        )
    except (KeyError, ValueError, TypeError):
        return None  # a foreign or damaged entry is treated as unknown


def _milliseconds(ttl: float) -> int:
    return max(1, int(ttl * 1000))


def _text(value: object) -> str:
    """Redis replies as text whether or not the client was made with ``decode_responses``."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def _guard(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis unavailable ({type(exc).__name__})") from None


__all__ = ["RedisSessionStore"]
