"""Redis session store: sessions shared by every worker and server that uses the same Redis.

Three deployments (see ``docs/deployment.md``), chosen by the URL given to :meth:`from_url`:
``redis://`` (one Redis), ``redis+sentinel://h1:p1,h2:p2/service`` (the master Sentinel names,
followed across failovers) and ``redis+cluster://host:port`` (a Redis Cluster, from a seed node).

Layout on one Redis or behind Sentinel (``prefix`` defaults to ``mcp2anp:``):

- ``{prefix}s:{id}``: a hash with ``principal``, ``created_at``, ``last_used``, ``expires_at``,
  ``implicit``, ``pkey`` and, once the MCP handshake is done, ``handshake``; expires by Redis
  TTL (the TTL the registry passes: the time to the session's deadline plus the touch interval,
  so throttled writes never expire one early).
- ``{prefix}all``: a sorted set of session ids scored by TTL expiry, for counts and the global cap
  without ``KEYS``.
- ``{prefix}p:{sha256(principal)}``: the same per principal, for the per-principal cap and listing;
  its lowest score is the least recently used session, the one evicted when eviction is configured.
- ``{prefix}q:{sha256(principal)}``: with eviction configured, the principal's sessions still
  being created (reservations, scored as in its index), which eviction passes over: a new session
  evicts only when its commit takes it out of here.
- ``{prefix}ended``: a pub/sub channel on which a process announces a session it removed
  (DELETE, revocation, eviction), so every other process drops its live objects at once.

Creation is one Lua script (create-if-absent, caps and index updates atomic across processes).
A read is one ``HGETALL``; a write is one script call, made by the registry at most once per
touch interval per session.

On a Redis Cluster a script may only touch keys of one hash slot, so the same records are laid
out by hash tag (the part in braces picks the slot):

- ``{prefix}s:{<id>}``: the session hash, in the session's own slot (the MCP event log
  ``{prefix}log:{<id>}`` of :mod:`~mcp2anp_middleware.mcp_hosting.redis_backplane` shares it);
- ``{prefix}p:{<sha256(principal)>}``: the principal's index, in the principal's slot, so the
  per-principal cap (and eviction) stays one atomic script; its reservations
  ``{prefix}q:{<sha256(principal)>}`` share that slot;
- ``{prefix}all:{<n>}`` for n in 0..15: the global index as sharded sorted sets; a session is in
  shard ``crc32(id) % 16``. The count is the sum of the shards; the global cap is enforced by
  adding first and counting after (rolled back when over), so racing creators can be refused
  together but never admitted past the cap.

A cluster creation is therefore a sequence of single-slot steps: claim the id (create-if-absent
in the session's slot), admit it in the principal's index (cap, eviction), add it to its shard
(global cap). A refused step undoes the earlier ones; a step that fails because Redis is away
raises :class:`StoreUnavailable` and the registry removes what was made (a fenced delete), the
index entries left otherwise expire with their scores. Lifecycle notices use classic pub/sub,
which a cluster broadcasts to every node (any Redis version; sharded pub/sub needs Redis 7).

Durability: with ``wait_replicas`` (default 1 for Sentinel and Cluster URLs, 0 for ``redis://``)
every creation and write is followed by ``WAIT wait_replicas wait_timeout`` on the connection
that made it, and is reported as failed (:class:`StoreUnavailable`, HTTP 503) unless that many
replicas confirm. A session whose id the client has received is thus on a replica, the one
Sentinel or the cluster promotes when the master dies (both prefer the most up-to-date replica).
Deletions wait too but are not refused when unconfirmed. Without replicas (``wait_replicas=0``)
a failover loses what the replica had not yet received; AOF (``appendfsync everysec``) covers
a restart of one Redis, not a failover.

Any failure while Redis is unreachable, whatever redis-py raises (its cluster client can raise
``AttributeError`` and friends mid-failover, not only ``RedisError``), becomes
:class:`StoreUnavailable`; redis-py reconnects by itself (Sentinel: to the new master it asks the
sentinels for; Cluster: after re-reading the slot map).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Self, TypeVar

from redis.asyncio.cluster import PipelineCommand, RedisCluster
from redis.exceptions import NoScriptError, RedisError

from mcp2anp_middleware.sessions.stores.base import (
    CapExceeded,
    Caps,
    CommitOutcome,
    CreateOutcome,
    SessionRecord,
    StoreUnavailable,
    UnconfirmedCommit,
)
from mcp2anp_middleware.sessions.stores.redis_connect import AnyRedis, connect

T = TypeVar("T")
logger = logging.getLogger("mcp2anp_middleware.sessions")

_FIELDS = ("principal", "created_at", "last_used", "expires_at", "implicit")
SHARDS = 16

# Evicts the principal's least recently used sessions that are not pending reservations (in
# the principal's reservation set), never ``sid``, while more of those than ``cap`` remain; adds
# each victim's id and fields to ``result``. The caller pruned both sets of what has expired. With
# ``session_prefix`` empty (a cluster: the records are in other slots) only the index entries go,
# and only the ids are added.
_TRIM = """
local function trim(pkey, qkey, sid, cap, evict, allkey, session_prefix, fields, result)
  if cap <= 0 or evict ~= '1' then return end
  local reserved = redis.call('ZCARD', qkey)
  local over = redis.call('ZCARD', pkey) - reserved - cap
  if over <= 0 then return end
  -- (the victims are among the first over + reserved + 1: the rest are pending, or sid)
  for _, victim in ipairs(redis.call('ZRANGE', pkey, 0, over + reserved)) do
    if victim ~= sid and not redis.call('ZSCORE', qkey, victim) then
      table.insert(result, victim)
      if session_prefix ~= '' then
        local vkey = session_prefix .. victim
        for _, value in ipairs(redis.call('HMGET', vkey, unpack(fields))) do
          table.insert(result, value or '')
        end
        redis.call('DEL', vkey)
        redis.call('ZREM', allkey, victim)
      end
      redis.call('ZREM', pkey, victim)
      over = over - 1
      if over <= 0 then return end
    end
  end
end
"""

_CREATE = (
    _TRIM
    + """
local skey, allkey, pkey, qkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local global_cap, principal_cap, evict = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6]
local session_prefix, pending = ARGV[7], ARGV[19]
if redis.call('EXISTS', skey) == 1 then return {'exists'} end
redis.call('ZREMRANGEBYSCORE', allkey, '-inf', now)
redis.call('ZREMRANGEBYSCORE', pkey, '-inf', now)
redis.call('ZREMRANGEBYSCORE', qkey, '-inf', now)
local held = redis.call('ZCARD', pkey)
local at_cap = principal_cap > 0 and held >= principal_cap
if at_cap and (evict ~= '1' or held >= 2 * principal_cap) then return {'principal'} end
local total_after = redis.call('ZCARD', allkey)
if at_cap then total_after = total_after - 1 end
if global_cap > 0 and total_after >= global_cap then return {'global'} end
redis.call('HSET', skey, 'principal', ARGV[8], 'created_at', ARGV[9], 'last_used', ARGV[10],
           'expires_at', ARGV[11], 'implicit', ARGV[12], 'pkey', pkey)
if ARGV[18] ~= '' then redis.call('HSET', skey, 'handshake', ARGV[18]) end
redis.call('PEXPIRE', skey, ttl_ms)
local expires = now + ttl_ms / 1000
redis.call('ZADD', allkey, expires, sid)
redis.call('ZADD', pkey, expires, sid)
if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
local result = {'ok'}
if pending == '1' then
  redis.call('ZADD', qkey, expires, sid)
  if redis.call('PTTL', qkey) < ttl_ms then redis.call('PEXPIRE', qkey, ttl_ms) end
else
  redis.call('ZREM', qkey, sid)
  local fields = {unpack(ARGV, 13, 17)}
  trim(pkey, qkey, sid, principal_cap, evict, allkey, session_prefix, fields, result)
end
return result
"""
)

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
  -- a session still being created stays one (its reservation lapses with its index entry)
  local qkey = ARGV[8] .. string.sub(pkey, #ARGV[9] + 1)
  if redis.call('ZADD', qkey, 'XX', 'CH', expires, sid) == 1 then
    if redis.call('PTTL', qkey) < ttl_ms then redis.call('PEXPIRE', qkey, ttl_ms) end
  end
end
return 1
"""

# The commit of a reservation: a write (fenced by creation time), out of the principal's
# reservations, then evictions for it.
_COMMIT = (
    _TRIM
    + """
local skey, allkey, pkey, qkey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
if redis.call('HGET', skey, 'created_at') ~= ARGV[4] then return {0} end
redis.call('HSET', skey, 'last_used', ARGV[5], 'expires_at', ARGV[6])
if ARGV[7] ~= '' then redis.call('HSET', skey, 'handshake', ARGV[7]) end
redis.call('PEXPIRE', skey, ttl_ms)
local expires = now + ttl_ms / 1000
redis.call('ZADD', allkey, expires, sid)
redis.call('ZADD', pkey, expires, sid)
if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
redis.call('ZREM', qkey, sid)
local result = {1}
local cap = tonumber(ARGV[8])
if cap > 0 and ARGV[9] == '1' then
  redis.call('ZREMRANGEBYSCORE', pkey, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', qkey, '-inf', now)
  trim(pkey, qkey, sid, cap, ARGV[9], allkey, ARGV[10], {unpack(ARGV, 11, 15)}, result)
end
return result
"""
)

_REMOVE = """
local skey, allkey = KEYS[1], KEYS[2]
local sid, fence, channel, notice = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if fence ~= '' and redis.call('HGET', skey, 'created_at') ~= fence then return 0 end
local pkey = redis.call('HGET', skey, 'pkey')
local deleted = redis.call('DEL', skey)
redis.call('ZREM', allkey, sid)
if pkey then
  redis.call('ZREM', pkey, sid)
  redis.call('ZREM', ARGV[5] .. string.sub(pkey, #ARGV[6] + 1), sid)
end
if deleted == 1 then
  redis.call('DEL', KEYS[3])
  if notice ~= '' then redis.call('PUBLISH', channel, notice) end
end
return deleted
"""


def event_log_key(prefix: str, session_id: str, *, cluster: bool) -> str:
    """Where the MCP endpoint's backplane keeps a session's event log (a Redis Stream) under a
    store's prefix: one layout for the log's writer and for the store's removal script, which
    deletes it with the session. On a cluster it shares the slot of the session's record."""
    if cluster:
        return f"{prefix}log:{{{session_id}}}"
    return f"{prefix}log:{session_id}"


# -- Redis Cluster: one slot per script ----------------------------------------------------------

_CLAIM = """
local skey = KEYS[1]
if redis.call('EXISTS', skey) == 1 then return 'exists' end
redis.call('HSET', skey, 'principal', ARGV[3], 'created_at', ARGV[4], 'last_used', ARGV[5],
           'expires_at', ARGV[6], 'implicit', ARGV[7], 'pkey', ARGV[2])
if ARGV[8] ~= '' then redis.call('HSET', skey, 'handshake', ARGV[8]) end
redis.call('PEXPIRE', skey, tonumber(ARGV[1]))
return 'ok'
"""

_ADMIT = """
local pkey, qkey = KEYS[1], KEYS[2]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
local cap, evict, pending = tonumber(ARGV[4]), ARGV[5], ARGV[6]
redis.call('ZREMRANGEBYSCORE', pkey, '-inf', now)
redis.call('ZREMRANGEBYSCORE', qkey, '-inf', now)
local held = redis.call('ZCARD', pkey)
local at_cap = '0'
if not redis.call('ZSCORE', pkey, sid) and cap > 0 and held >= cap then
  if evict ~= '1' or held >= 2 * cap then return {'principal'} end
  at_cap = '1'
end
local expires = now + ttl_ms / 1000
redis.call('ZADD', pkey, expires, sid)
if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
if pending == '1' then
  redis.call('ZADD', qkey, expires, sid)
  if redis.call('PTTL', qkey) < ttl_ms then redis.call('PEXPIRE', qkey, ttl_ms) end
end
return {'ok', at_cap}
"""

# A cluster commit's step in the principal's slot (also a creation's that counts at once, once
# past the global cap): indexed as a write indexes it, out of the reservations, then the ids of
# the sessions evicted for it (their records are removed after).
_SETTLE = (
    _TRIM
    + """
local pkey, qkey = KEYS[1], KEYS[2]
local sid, now, ttl_ms = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
redis.call('ZADD', pkey, now + ttl_ms / 1000, sid)
if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
redis.call('ZREM', qkey, sid)
local result = {'ok'}
if tonumber(ARGV[4]) > 0 and ARGV[5] == '1' then
  redis.call('ZREMRANGEBYSCORE', pkey, '-inf', now)
  redis.call('ZREMRANGEBYSCORE', qkey, '-inf', now)
  trim(pkey, qkey, sid, tonumber(ARGV[4]), ARGV[5], '', '', {}, result)
end
return result
"""
)

_INDEX = """
local pkey, qkey, ttl_ms = KEYS[1], KEYS[2], tonumber(ARGV[3])
redis.call('ZADD', pkey, tonumber(ARGV[2]), ARGV[1])
if redis.call('PTTL', pkey) < ttl_ms then redis.call('PEXPIRE', pkey, ttl_ms) end
if redis.call('ZADD', qkey, 'XX', 'CH', tonumber(ARGV[2]), ARGV[1]) == 1 then
  if redis.call('PTTL', qkey) < ttl_ms then redis.call('PEXPIRE', qkey, ttl_ms) end
end
return 1
"""

# Index entries a write or commit set (this expiry), taken out again: a later session with the
# same id (a principal's implicit session, made anew meanwhile) set its own and keeps them.
_UNINDEX_OWN = """
for _, key in ipairs(KEYS) do
  local score = redis.call('ZSCORE', key, ARGV[1])
  if score and tonumber(score) == tonumber(ARGV[2]) then redis.call('ZREM', key, ARGV[1]) end
end
return 1
"""

_TOUCH = """
local skey = KEYS[1]
if redis.call('HGET', skey, 'created_at') ~= ARGV[2] then return false end
redis.call('HSET', skey, 'last_used', ARGV[3], 'expires_at', ARGV[4])
if ARGV[5] ~= '' then redis.call('HSET', skey, 'handshake', ARGV[5]) end
redis.call('PEXPIRE', skey, tonumber(ARGV[1]))
return redis.call('HGET', skey, 'pkey') or ''
"""

_TAKE = """
local skey, fence = KEYS[1], ARGV[1]
local fields = redis.call('HGETALL', skey)
if #fields == 0 then return {0, ''} end
if fence ~= '' and redis.call('HGET', skey, 'created_at') ~= fence then return {0, ''} end
local pkey = redis.call('HGET', skey, 'pkey') or ''
redis.call('DEL', skey)
return {1, pkey, unpack(fields)}
"""


class RedisSessionStore:
    """Session records in Redis; one Redis, a Sentinel-managed master or a Redis Cluster.

    ``client`` is whatever :func:`~.redis_connect.connect` made (an ``asyncio.Redis``, possibly
    Sentinel-managed, or an ``asyncio.RedisCluster``; the latter switches to the hash-tagged
    layout). ``prefix`` must not contain ``{``: the cluster layout's hash tags follow it.
    """

    def __init__(
        self,
        client: AnyRedis,
        *,
        prefix: str = "mcp2anp:",
        touch_interval: float = 30.0,
        wait_replicas: int = 0,
        wait_timeout: float = 0.5,
        recheck: float = 1.0,
    ) -> None:
        if "{" in prefix or "}" in prefix:
            raise ValueError("the Redis key prefix must not contain braces (hash tags)")
        self.client: Any = client
        self.prefix = prefix
        self.cluster = isinstance(client, RedisCluster)
        self.default_touch_interval = touch_interval
        self.recheck = recheck
        """Seconds a process trusts its last read of a session it holds while following the
        notices of :meth:`ended_sessions` (0: read on every request)."""
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = max(1, int(wait_timeout * 1000))
        self._all_key = f"{prefix}all"
        self._session_prefix = f"{prefix}s:"
        self.ended_channel = f"{prefix}ended"
        self._create = client.register_script(_CREATE)
        self._write = client.register_script(_WRITE)
        self._commit = client.register_script(_COMMIT)
        self._remove = client.register_script(_REMOVE)
        self._claim = client.register_script(_CLAIM)
        self._admit = client.register_script(_ADMIT)
        self._index = client.register_script(_INDEX)
        self._settle = client.register_script(_SETTLE)
        self._unindex_own = client.register_script(_UNINDEX_OWN)
        self._touch = client.register_script(_TOUCH)
        self._take = client.register_script(_TAKE)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        prefix: str = "mcp2anp:",
        touch_interval: float = 30.0,
        timeout: float = 2.0,
        wait_replicas: int | None = None,
        wait_timeout: float | None = None,
        recheck: float = 1.0,
    ) -> Self:
        """A store for ``redis://``, ``redis+sentinel://`` or ``redis+cluster://`` URLs (see
        :mod:`.redis_connect`); ``wait_replicas``/``wait_timeout`` override the URL's."""
        target = connect(url, timeout=timeout)
        waits = target.wait_timeout_ms / 1000 if wait_timeout is None else wait_timeout
        if (target.wait_replicas if wait_replicas is None else wait_replicas) and waits >= timeout:
            # The client would give up on WAIT's reply first, and a change Redis made (an
            # eviction) would look like one it never made.
            raise ValueError(
                f"wait_timeout ({waits} s) must be shorter than the client timeout ({timeout} s)"
            )
        return cls(
            target.client,
            prefix=prefix,
            touch_interval=touch_interval,
            recheck=recheck,
            wait_replicas=target.wait_replicas if wait_replicas is None else wait_replicas,
            wait_timeout=target.wait_timeout_ms / 1000 if wait_timeout is None else wait_timeout,
        )

    # -- keys ------------------------------------------------------------------------------------

    def event_log_key(self, session_id: str) -> str:
        """The key of the session's MCP event log (see :func:`event_log_key`)."""
        return event_log_key(self.prefix, session_id, cluster=self.cluster)

    def _session_key(self, session_id: str) -> str:
        if self.cluster:
            return f"{self._session_prefix}{{{session_id}}}"
        return self._session_prefix + session_id

    def _principal_key(self, principal: str) -> str:
        digest = hashlib.sha256(principal.encode()).hexdigest()[:32]
        return f"{self.prefix}p:{{{digest}}}" if self.cluster else f"{self.prefix}p:{digest}"

    def _principal_keys(self, record: SessionRecord) -> list[str]:
        """A script's keys for a change to ``record`` and its principal's index (one Redis)."""
        pkey = self._principal_key(record.principal)
        return [
            self._session_key(record.session_id),
            self._all_key,
            pkey,
            self._reservations_key(pkey),
        ]

    def _reservations_key(self, principal_key: str) -> str:
        """The principal's reservations not yet committed (a sorted set by expiry), in the slot
        of its index: ``{prefix}q:`` beside ``{prefix}p:``."""
        return f"{self.prefix}q:" + principal_key[len(self.prefix) + 2 :]

    def _shard_key(self, session_id: str) -> str:
        return self._shard(zlib.crc32(session_id.encode()) % SHARDS)

    def _shard(self, index: int) -> str:
        return f"{self.prefix}all:{{{index}}}"

    def _ack_key(self, session_id: str) -> str:
        """A short-lived key in the session's slot: writing it gives the connection that then
        sends ``WAIT`` a replication offset at least that of the session's last change."""
        return f"{self.prefix}ack:{{{session_id}}}"

    # -- the interface ---------------------------------------------------------------------------

    async def create(
        self,
        record: SessionRecord,
        *,
        ttl: float,
        now: float,
        caps: Caps,
        pending: bool = False,
    ) -> CreateOutcome:
        if self.cluster:
            return await self._create_in_cluster(
                record, ttl=ttl, now=now, caps=caps, pending=pending
            )
        keys = self._principal_keys(record)
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
            "1" if pending else "0",
        ]
        raw, acked = await _guard(lambda: self._durably(self._create, keys, args))
        reply = [_text(part) for part in raw]
        status = reply[0]
        if status == "exists":
            return CreateOutcome(created=False)
        if status == "principal":
            raise CapExceeded("principal", caps.per_principal or 0)
        if status == "global":
            raise CapExceeded("global", caps.global_limit or 0)
        evicted = _victims(reply[1:])
        try:
            self._confirmed(acked)
        except StoreUnavailable as exc:
            raise UnconfirmedCommit(str(exc), evicted) from None
        return CreateOutcome(created=True, evicted=evicted)

    async def read(self, session_id: str) -> SessionRecord | None:
        raw = await _guard(lambda: self.client.hgetall(self._session_key(session_id)))
        return _record(session_id, {_text(k): _text(v) for k, v in raw.items()})

    async def write(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        if self.cluster:
            return await self._write_in_cluster(record, ttl=ttl, now=now)
        keys = [self._session_key(record.session_id), self._all_key]
        args = [*_written(record, now, ttl), f"{self.prefix}q:", f"{self.prefix}p:"]
        written, acked = await _guard(lambda: self._durably(self._write, keys, args))
        if written:
            self._confirmed(acked)
        return bool(written)

    async def commit(
        self, record: SessionRecord, *, ttl: float, now: float, caps: Caps
    ) -> CommitOutcome:
        if self.cluster:
            return await self._commit_in_cluster(record, ttl=ttl, now=now, caps=caps)
        keys = self._principal_keys(record)
        args = [
            *_written(record, now, ttl),
            caps.per_principal or 0,
            "1" if caps.evict_oldest else "0",
            self._session_prefix,
            *_FIELDS,
        ]
        raw, acked = await _guard(lambda: self._durably(self._commit, keys, args))
        reply = [_text(part) for part in raw]
        if reply[0] != "1":
            return CommitOutcome(committed=False)
        evicted = _victims(reply[1:])
        try:
            self._confirmed(acked)
        except StoreUnavailable as exc:
            raise UnconfirmedCommit(str(exc), evicted) from None
        return CommitOutcome(committed=True, evicted=evicted)

    async def remove(self, session_id: str, *, created_at: float | None = None) -> bool:
        return await self._remove_announcing(session_id, created_at, "")

    async def remove_and_announce(self, session_id: str, notice: str) -> bool:
        """:meth:`remove`, then :meth:`announce_ended` with ``notice`` if it removed the session:
        one round trip (one script) where the store is a single Redis."""
        return await self._remove_announcing(session_id, None, notice)

    async def _remove_announcing(
        self, session_id: str, created_at: float | None, notice: str
    ) -> bool:
        fence = "" if created_at is None else repr(float(created_at))
        if self.cluster:
            removed = await self._take_in_cluster(session_id, fence) is not None
            if removed and notice:
                with contextlib.suppress(StoreUnavailable):  # best effort, as announce_ended
                    await self.announce_ended(notice)
            return removed
        # The session's MCP event log goes with it (whoever removes it: a worker, an admin
        # script); on a cluster its owner drops it, as it is in another script's slot.
        keys = [self._session_key(session_id), self._all_key, self.event_log_key(session_id)]
        args: list[str | int] = [
            session_id,
            fence,
            self.ended_channel,
            notice,
            f"{self.prefix}q:",
            f"{self.prefix}p:",
        ]
        deleted, _ = await _guard(lambda: self._durably(self._remove, keys, args))
        return bool(deleted)  # an unconfirmed deletion is still a deletion: not refused

    async def principal_sessions(
        self, principal: str | None, *, now: float, limit: int | None = None
    ) -> list[SessionRecord]:
        start, num = (None, None) if limit is None else (0, limit)
        if principal is None and self.cluster:
            ids = await _guard(lambda: self._everyone(now, limit))
        else:
            key = self._all_key if principal is None else self._principal_key(principal)

            async def ranked() -> list[str]:
                found = await self.client.zrangebyscore(
                    key, f"({now}", "+inf", start=start, num=num
                )
                return [_text(i) for i in found]

            ids = await _guard(ranked)
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
        if self.cluster:
            return await _guard(lambda: self._cluster_count(now))
        return int(await _guard(lambda: self.client.zcount(self._all_key, f"({now}", "+inf")))

    async def expire(self, *, now: float) -> list[SessionRecord]:
        keys = [self._shard(i) for i in range(SHARDS)] if self.cluster else [self._all_key]

        async def prune() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.zremrangebyscore(key, "-inf", now)
                await pipe.execute()

        await _guard(prune)
        return []  # Redis expires the sessions themselves (TTL)

    async def announce_ended(self, notice: str) -> None:
        """Tell every process that a session ended here (``kind:id``; best effort: the record is
        gone already, so a process that misses this still refuses the id at its next lookup).

        On a cluster, classic ``PUBLISH`` reaches subscribers on every node."""
        await _guard(lambda: self.client.publish(self.ended_channel, notice))

    async def ended_sessions(self) -> AsyncIterator[str]:
        """The notices processes announced, for as long as the caller keeps iterating.

        A lost connection (a failover) ends the iteration with :class:`StoreUnavailable`; the
        caller iterates again, on a fresh subscription to whichever node now answers."""
        if self.cluster:  # a cluster subscription picks its node from the slot map: load it
            await _guard(self.client.initialize)
        pubsub = self.client.pubsub()
        try:
            await _guard(lambda: pubsub.subscribe(self.ended_channel))
            while True:
                message = await _guard(lambda: pubsub.get_message(timeout=5.0))
                if message is None:
                    continue
                if message.get("type") == "message":
                    yield _text(message["data"])
                elif message.get("type") == "subscribe":
                    yield "subscribed:"  # Redis confirmed it: from here on no notice is missed
        finally:
            try:
                await pubsub.aclose()
            except Exception:  # closing a connection to a dead node: nothing left to release
                logger.debug("Closing the session-end subscription failed")

    async def ping(self) -> bool:
        try:
            return bool(await self.client.ping())
        except Exception:
            return False

    async def aclose(self) -> None:
        await self.client.aclose()

    # -- durability ------------------------------------------------------------------------------

    async def _durably(
        self, script: Any, keys: list[str], args: list[str | int]
    ) -> tuple[Any, int | None]:
        """Run ``script``, then (when replicas are asked for) ``WAIT`` on the same connection:
        one round trip in a pipeline. Returns the script's reply and the replicas that
        confirmed (None: not asked)."""
        if not self.wait_replicas:
            return await script(keys=keys, args=args), None
        # The script goes as a bare EVALSHA: run through ``script(client=pipe)``, redis-py would
        # first ask the server whether it knows the script (SCRIPT EXISTS), a round trip more
        # on every durable write. A server that does not know it yet (a new master after a
        # failover, a flushed script cache) answers NOSCRIPT without running anything: the
        # script is loaded and the pair sent once more.
        async with self.client.pipeline(transaction=False) as pipe:
            try:
                return await self._run_and_wait(pipe, script, keys, args)
            except NoScriptError:
                script.sha = await self.client.script_load(script.script)
                return await self._run_and_wait(pipe, script, keys, args)

    async def _run_and_wait(
        self, pipe: Any, script: Any, keys: list[str], args: list[str | int]
    ) -> tuple[Any, int]:
        pipe.evalsha(script.sha, len(keys), *keys, *args)
        pipe.execute_command("WAIT", self.wait_replicas, self.wait_timeout_ms)
        reply, acked = await pipe.execute()
        return reply, int(acked)

    def _confirmed(self, acked: int | None) -> None:
        if acked is not None and acked < self.wait_replicas:
            raise StoreUnavailable(f"only {acked} of {self.wait_replicas} replicas confirmed")

    async def _cluster_wait(self, session_id: str) -> int | None:
        """``WAIT`` on the master of ``session_id``'s slot, on one connection after a write of
        the beacon key there (``WAIT`` counts from the connection's own last write; a cluster
        pipeline cannot carry scripts, so the node's connection is used directly)."""
        if not self.wait_replicas:
            return None
        key = self._ack_key(session_id)
        node = self.client.get_node_from_key(key)
        commands = [
            PipelineCommand(0, "SET", key, "1", "PX", 1000),
            PipelineCommand(1, "WAIT", self.wait_replicas, self.wait_timeout_ms),
        ]
        await node.execute_pipeline(commands)
        results: list[Any] = [done.result for done in commands]
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return int(results[1])

    # -- Redis Cluster: single-slot steps ---------------------------------------------------------

    async def _create_in_cluster(
        self, record: SessionRecord, *, ttl: float, now: float, caps: Caps, pending: bool
    ) -> CreateOutcome:
        sid = record.session_id
        ttl_ms = _milliseconds(ttl)
        skey, pkey, shard = (
            self._session_key(sid),
            self._principal_key(record.principal),
            self._shard_key(sid),
        )
        claim: list[str | int] = [ttl_ms, pkey, *_values(record), record.handshake or ""]
        if _text(await _guard(lambda: self._claim(keys=[skey], args=claim))) == "exists":
            return CreateOutcome(created=False)
        fence = repr(float(record.created_at))
        admit: list[str | int] = [
            sid,
            repr(now),
            ttl_ms,
            caps.per_principal or 0,
            "1" if caps.evict_oldest else "0",
            "1" if pending else "0",
        ]
        keys = [pkey, self._reservations_key(pkey)]
        reply = [_text(part) for part in await _guard(lambda: self._admit(keys=keys, args=admit))]
        if reply[0] == "principal":
            await _guard(lambda: self._take(keys=[skey], args=[fence]))
            raise CapExceeded("principal", caps.per_principal or 0)
        expires = now + ttl_ms / 1000
        await _guard(lambda: self.client.zadd(shard, {sid: expires}))
        # At its cap (evicting), the creation frees a place, now or at its commit: counted as
        # the other stores count it (one over the cap at most while it is under way).
        limit = (caps.global_limit or 0) + (1 if reply[1] == "1" else 0)
        if caps.global_limit and await _guard(lambda: self._cluster_count(now)) > limit:
            await self._unindex(sid, pkey)
            await _guard(lambda: self._take(keys=[skey], args=[fence]))
            raise CapExceeded("global", caps.global_limit or 0)
        evicted: tuple[SessionRecord, ...] = ()
        if not pending:  # counts at once: evicts now, past the global cap's check
            evicted = await self._settle_in_cluster(sid, pkey, now, ttl_ms, caps)
        await self._confirm_evicting(sid, evicted)
        return CreateOutcome(created=True, evicted=evicted)

    async def _commit_in_cluster(
        self, record: SessionRecord, *, ttl: float, now: float, caps: Caps
    ) -> CommitOutcome:
        sid = record.session_id
        ttl_ms = _milliseconds(ttl)
        if await self._touch_in_cluster(record, now, ttl_ms) is None:
            return CommitOutcome(committed=False)
        pkey = self._principal_key(record.principal)
        evicted = await self._settle_in_cluster(sid, pkey, now, ttl_ms, caps)
        try:
            gone = await self._gone_meanwhile(sid, pkey, now + ttl_ms / 1000)
        except StoreUnavailable as exc:  # the victims are gone all the same
            raise UnconfirmedCommit(str(exc), evicted) from None
        if gone:
            if evicted:  # (ended and announced by the registry)
                raise UnconfirmedCommit("session removed during its commit", evicted)
            return CommitOutcome(committed=False)
        await self._confirm_evicting(sid, evicted)
        return CommitOutcome(committed=True, evicted=evicted)

    async def _settle_in_cluster(
        self, sid: str, pkey: str, now: float, ttl_ms: int, caps: Caps
    ) -> tuple[SessionRecord, ...]:
        """The session counts (out of its principal's reservations): evict for it. The victims
        leave the principal's index in one script, then their records go one by one; if the
        store fails midway, :class:`UnconfirmedCommit` carries those already taken."""
        settle: list[str | int] = [
            sid,
            repr(now),
            ttl_ms,
            caps.per_principal or 0,
            "1" if caps.evict_oldest else "0",
        ]
        keys = [pkey, self._reservations_key(pkey)]
        reply = [_text(part) for part in await _guard(lambda: self._settle(keys=keys, args=settle))]
        taken: list[SessionRecord] = []
        for victim in reply[1:]:
            try:
                record = await self._take_in_cluster(victim, "")
            except StoreUnavailable as exc:
                raise UnconfirmedCommit(str(exc), tuple(taken)) from None
            if record is not None:
                taken.append(record)
        return tuple(taken)

    async def _confirm_evicting(self, sid: str, evicted: tuple[SessionRecord, ...]) -> None:
        """The replicas' word on a change that evicted ``evicted`` (gone whatever they say)."""
        try:
            self._confirmed(await _guard(lambda: self._cluster_wait(sid)))
        except StoreUnavailable as exc:
            raise UnconfirmedCommit(str(exc), evicted) from None

    async def _write_in_cluster(self, record: SessionRecord, *, ttl: float, now: float) -> bool:
        sid = record.session_id
        ttl_ms = _milliseconds(ttl)
        pkey = await self._touch_in_cluster(record, now, ttl_ms)
        if pkey is None:
            return False
        expires = now + ttl_ms / 1000
        if pkey:
            index = [pkey, self._reservations_key(pkey)]
            await _guard(lambda: self._index(keys=index, args=[sid, repr(expires), ttl_ms]))
        if await self._gone_meanwhile(sid, pkey, expires):
            return False
        self._confirmed(await _guard(lambda: self._cluster_wait(sid)))
        return True

    async def _gone_meanwhile(self, sid: str, pkey: str | None, expires: float) -> bool:
        """Cluster only: whether the record went while a write's or a commit's later steps ran
        (a DELETE or a revocation on another worker, landing between them). Only the first step
        is fenced, so those steps put back the index entries the removal had taken: a ghost that
        counted against the caps (a principal locked out at its cap) until it expired. Taken
        out again here, each only while it holds ``expires`` (what these steps set): a later
        session with the same id (a principal's implicit session, made anew) keeps its own."""
        if await _guard(lambda: self.client.exists(self._session_key(sid))):
            return False
        args = [sid, repr(expires)]
        await _guard(lambda: self._unindex_own(keys=[self._shard_key(sid)], args=args))
        if pkey:
            index = [pkey, self._reservations_key(pkey)]
            await _guard(lambda: self._unindex_own(keys=index, args=args))
        return True

    async def _touch_in_cluster(self, record: SessionRecord, now: float, ttl_ms: int) -> str | None:
        """A write's steps in the session's slot and its shard: the record (fenced by creation
        time) and its global index entry. The principal's index key, or None when the record is
        gone (not written)."""
        sid = record.session_id
        args: list[str | int] = [
            ttl_ms,
            repr(float(record.created_at)),
            repr(record.last_used),
            repr(record.expires_at),
            record.handshake or "",
        ]
        pkey = await _guard(lambda: self._touch(keys=[self._session_key(sid)], args=args))
        if pkey is None:
            return None
        await _guard(lambda: self.client.zadd(self._shard_key(sid), {sid: now + ttl_ms / 1000}))
        return _text(pkey)

    async def _take_in_cluster(self, session_id: str, fence: str) -> SessionRecord | None:
        """Delete the session (fenced by creation time when ``fence``), then its index entries;
        the record removed, or None when there was none."""
        skey = self._session_key(session_id)
        reply = await _guard(lambda: self._take(keys=[skey], args=[fence]))
        pkey = _text(reply[1])
        await self._unindex(session_id, pkey or None)
        if not int(reply[0]):
            return None
        raw = [_text(part) for part in reply[2:]]
        try:  # best effort: a deletion that no replica confirmed is still a deletion
            await _guard(lambda: self._cluster_wait(session_id))
        except StoreUnavailable:
            logger.warning("A session deletion was not confirmed by a replica")
        return _record(session_id, dict(zip(raw[::2], raw[1::2], strict=False))) or SessionRecord(
            session_id, "", 0.0, 0.0, 0.0
        )

    async def _unindex(self, session_id: str, pkey: str | None) -> None:
        async def unindex() -> None:
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.zrem(self._shard_key(session_id), session_id)
                if pkey:
                    pipe.zrem(pkey, session_id)
                    pipe.zrem(self._reservations_key(pkey), session_id)
                await pipe.execute()

        await _guard(unindex)

    async def _cluster_count(self, now: float) -> int:
        async with self.client.pipeline(transaction=False) as pipe:
            for index in range(SHARDS):
                pipe.zcount(self._shard(index), f"({now}", "+inf")
            counts = await pipe.execute()
        return sum(int(c) for c in counts)

    async def _everyone(self, now: float, limit: int | None) -> list[str]:
        """All shards' live ids, least recently used first (a merge of the shards' orders)."""
        async with self.client.pipeline(transaction=False) as pipe:
            for index in range(SHARDS):
                pipe.zrangebyscore(
                    self._shard(index), f"({now}", "+inf", start=0 if limit else None,
                    num=limit, withscores=True,
                )  # fmt: skip
            replies = await pipe.execute()
        ranked = sorted((float(score), _text(sid)) for reply in replies for sid, score in reply)
        return [sid for _, sid in ranked[:limit]]


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


def _written(record: SessionRecord, now: float, ttl: float) -> list[str | int]:
    """The first arguments of the write and commit scripts: the record's id, the clock, the
    TTL, the creation it is fenced to and the fields a write changes."""
    return [
        record.session_id,
        repr(now),
        _milliseconds(ttl),
        repr(float(record.created_at)),
        repr(record.last_used),
        repr(record.expires_at),
        record.handshake or "",
    ]


def _victims(reply: list[str]) -> tuple[SessionRecord, ...]:
    """The evicted sessions a script returned: each an id followed by its :data:`_FIELDS` (one
    whose record had expired already is left out: it ended by itself)."""
    width = 1 + len(_FIELDS)
    found = []
    for start in range(0, len(reply) - width + 1, width):
        values = reply[start + 1 : start + width]
        record = _record(reply[start], dict(zip(_FIELDS, values, strict=True)))
        if record is not None:
            found.append(record)
    return tuple(found)


def _milliseconds(ttl: float) -> int:
    return max(1, int(ttl * 1000))


def _text(value: object) -> str:
    """Redis replies as text whether or not the client was made with ``decode_responses``."""
    return value.decode() if isinstance(value, bytes) else str(value)


async def _guard(call: Callable[[], Awaitable[T]]) -> T:
    """Run one store call; whatever redis-py raises becomes :class:`StoreUnavailable` (a 503).

    Not only ``RedisError``/``OSError``: mid-failover redis-py's cluster client has raised
    ``AttributeError`` and ``TypeError`` from half-rebuilt connection state. A request must get
    503 and Retry-After then, never 500; the exception is logged so a real bug is still seen."""
    try:
        return await call()
    except StoreUnavailable:
        raise
    except (RedisError, OSError) as exc:
        raise StoreUnavailable(f"Redis unavailable ({type(exc).__name__})") from None
    except Exception as exc:
        logger.warning("Redis client failed unexpectedly (%s): store treated as unavailable", exc)
        raise StoreUnavailable(f"Redis unavailable ({type(exc).__name__})") from None


__all__ = ["RedisSessionStore"]
