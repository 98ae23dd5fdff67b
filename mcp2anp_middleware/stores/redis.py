"""Redis session store: sessions shared by every worker and server that uses the same Redis.

Layout (``prefix`` defaults to ``mcp2anp:``):

- ``{prefix}s:{id}``: a hash with ``principal``, ``created_at``, ``last_accessed``, ``implicit``,
  ``pkey``; expires by Redis TTL (the idle timeout plus the touch interval).
- ``{prefix}all``: a sorted set of session ids scored by expiry time, for counts and the global cap
  without ``KEYS``.
- ``{prefix}p:{sha256(principal)}``: the same per principal, for the per-principal cap; its lowest
  score is the least recently used session, the one evicted when eviction is configured.

Creation is one Lua script (create-if-absent, caps and index updates atomic across processes).
A lookup is one ``HGETALL``; a touch is one script call, made only when the session has not been
written for ``touch_interval`` seconds, so busy sessions do not cost a write per request. Any Redis
failure raises :class:`StoreUnavailable` (HTTP 503); redis-py reconnects by itself when Redis is
back. Needs a single Redis (or a primary behind Sentinel), not Redis Cluster: scripts touch keys of
several hash slots.
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable
from typing import TypeVar

from redis import asyncio as aioredis
from redis.exceptions import RedisError

from .base import CapExceeded, Caps, CreateOutcome, SessionRecord, StoredSession, StoreUnavailable

T = TypeVar("T")

_CREATE = """
local skey, allkey, pkey = KEYS[1], KEYS[2], KEYS[3]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local global_cap, principal_cap, evict = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local session_prefix = ARGV[7]
if redis.call('EXISTS', skey) == 1 then return {'exists', ''} end
redis.call('ZREMRANGEBYSCORE', allkey, '-inf', now)
redis.call('ZREMRANGEBYSCORE', pkey, '-inf', now)
local evicted = ''
local at_cap = principal_cap > 0 and redis.call('ZCARD', pkey) >= principal_cap
if at_cap and evict ~= '1' then return {'principal', ''} end
local total_after = redis.call('ZCARD', allkey)
if at_cap then total_after = total_after - 1 end
if global_cap > 0 and total_after >= global_cap then return {'global', ''} end
if at_cap then
  evicted = redis.call('ZRANGE', pkey, 0, 0)[1]
  redis.call('DEL', session_prefix .. evicted)
  redis.call('ZREM', allkey, evicted)
  redis.call('ZREM', pkey, evicted)
end
redis.call('HSET', skey, 'principal', ARGV[8], 'created_at', ARGV[9],
           'last_accessed', ARGV[10], 'implicit', ARGV[11], 'pkey', pkey)
redis.call('PEXPIRE', skey, ttl_ms)
local expires = now + ttl_ms / 1000
redis.call('ZADD', allkey, expires, sid)
redis.call('ZADD', pkey, expires, sid)
if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
return {'ok', evicted}
"""

_TOUCH = """
local skey, allkey = KEYS[1], KEYS[2]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('EXISTS', skey) == 0 then return 0 end
local pkey = redis.call('HGET', skey, 'pkey')
redis.call('HSET', skey, 'last_accessed', ARGV[2])
redis.call('PEXPIRE', skey, ttl_ms)
local expires = now + ttl_ms / 1000
redis.call('ZADD', allkey, expires, sid)
if pkey then
  redis.call('ZADD', pkey, expires, sid)
  if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
end
return 1
"""

_DELETE = """
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
    holds_live_objects = False

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
        self._create = client.register_script(_CREATE)
        self._touch = client.register_script(_TOUCH)
        self._delete = client.register_script(_DELETE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "mcp2anp:",
        touch_interval: float = 30.0,
        timeout: float = 2.0,
    ) -> RedisSessionStore:
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
        self, session: StoredSession, *, ttl: float, now: float, caps: Caps
    ) -> CreateOutcome:
        keys = [
            self._session_key(session.session_id),
            self._all_key,
            self._principal_key(session.principal),
        ]
        args: list[str | int] = [
            session.session_id,
            repr(now),
            int(ttl * 1000),
            caps.global_limit or 0,
            caps.per_principal or 0,
            "1" if caps.evict_oldest else "0",
            self._session_prefix,
            session.principal,
            repr(session.created_at),
            repr(session.last_accessed),
            "1" if session.implicit else "0",
        ]
        status, evicted = (
            _text(part) for part in await _guard(lambda: self._create(keys=keys, args=args))
        )
        if status == "exists":
            return CreateOutcome(created=False)
        if status == "principal":
            raise CapExceeded("principal", caps.per_principal or 0)
        if status == "global":
            raise CapExceeded("global", caps.global_limit or 0)
        return CreateOutcome(created=True, evicted=(evicted,) if evicted else ())

    async def load(self, session_id: str) -> SessionRecord | None:
        raw = await _guard(lambda: self.client.hgetall(self._session_key(session_id)))
        fields = {_text(k): _text(v) for k, v in raw.items()}
        if not fields:
            return None
        try:
            return SessionRecord(
                session_id=session_id,
                principal=fields["principal"],
                created_at=float(fields["created_at"]),
                last_accessed=float(fields["last_accessed"]),
                implicit=fields.get("implicit") == "1",
            )
        except (KeyError, ValueError):
            return None  # a foreign or damaged entry is treated as unknown

    async def touch(self, session: StoredSession, *, ttl: float, now: float) -> bool:
        keys = [self._session_key(session.session_id), self._all_key]
        args: list[str | int] = [session.session_id, repr(now), int(ttl * 1000)]
        return bool(await _guard(lambda: self._touch(keys=keys, args=args)))

    async def delete(self, session_id: str, *, created_at: float | None = None) -> bool:
        keys = [self._session_key(session_id), self._all_key]
        args = [session_id, "" if created_at is None else repr(created_at)]
        return bool(await _guard(lambda: self._delete(keys=keys, args=args)))

    async def expire(
        self,
        *,
        now: float,
        idle_timeout: float,
        max_age: float | None,
        is_busy: Callable[[str], bool],
    ) -> list[tuple[StoredSession, str]]:
        await _guard(lambda: self.client.zremrangebyscore(self._all_key, "-inf", now))
        return []  # Redis expires the sessions themselves (TTL)

    async def count(self, *, now: float) -> int:
        return int(await _guard(lambda: self.client.zcount(self._all_key, f"({now}", "+inf")))

    async def count_for(self, principal: str, *, now: float) -> int:
        key = self._principal_key(principal)
        return int(await _guard(lambda: self.client.zcount(key, f"({now}", "+inf")))

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except (RedisError, OSError):
            return False

    async def aclose(self) -> None:
        await self.client.aclose()


def _text(value: object) -> str:
    """Redis replies as text whether or not the client was made with ``decode_responses``."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def _guard(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis unavailable ({type(exc).__name__})") from None


__all__ = ["RedisSessionStore"]
