"""The backplane over Redis: what the workers serving one session share, in the session store's
Redis.

- Event logs are Redis Streams, ``{prefix}log:{session id}``: fields ``s`` (stream), ``m`` (the
  message's JSON, empty for a priming event) and ``f`` (``1`` on a stream's response). Each
  append trims the log to about ``max_events`` and sets its expiry to ``retention``; the log is
  deleted when its session ends. Event ids are Redis's own.
- Live events go over pub/sub on ``{prefix}ev:{session id}``, subscribed by a worker only while
  it holds a GET stream of that session; notes go to ``{prefix}w:{worker}`` (one worker) or
  ``{prefix}workers`` (all of them). One pub/sub connection per worker carries them all.
- Which GET holds a session's standalone stream is ``{prefix}get:{session id}`` (a token,
  renewed by its holder, lapsing ``CLAIM_SECONDS`` after its last renewal); a take-over sets it
  and publishes the new holder on the session's channel in one script.
- The request-state key ring is one value, ``{prefix}request-state-keys``, changed by one script
  run on Redis's clock: the first key is made when first asked for; a new one is staged
  ``stage`` seconds ahead of use once the newest is ``rotate`` seconds old; three are kept.

On a Redis Cluster (the store was made from a ``redis+cluster://`` URL) the event log is
``{prefix}log:{<session id>}``: hash-tagged by the session id, so it lives in the slot of the
session's record and a session's keys move and fail over together. The channels stay classic
pub/sub, which the cluster broadcasts to every node: a worker subscribed on any node hears a
publication made on any other. (Sharded pub/sub would keep each session's events on its own
shard, but needs Redis 7; classic pub/sub works on every version.) A cluster's
subscription is bound to one node; if that node fails the relay subscribes afresh, on whichever
node the client's slot map now names. Behind one Redis or Sentinel, nothing differs.
"""

from __future__ import annotations

import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream
from redis.asyncio.cluster import RedisCluster

from mcp2anp_middleware.logging_setup import traceback_text
from mcp2anp_middleware.mcp_hosting.backplane import (
    CLAIM_SECONDS,
    DEFAULT_MAX_EVENTS,
    DEFAULT_RETENTION,
    LISTENER_BUFFER,
    OWNER_STREAM,
    Event,
    Note,
    NoteHandler,
    deliver,
    new_worker_id,
    parse_priming_id,
)
from mcp2anp_middleware.sessions.stores.redis import event_log_key
from mcp2anp_middleware.sessions.stores.redis_connect import AnyRedis

logger = logging.getLogger("mcp2anp_middleware.mcp_hosting")

_EVENT_ID = re.compile(r"^[0-9]{1,20}-[0-9]{1,20}$")
SUBSCRIBE_TIMEOUT = 5.0
CLOCK_MARGIN_MS = 60_000
KEY_ROTATION = 86_400.0
KEY_STAGING = 180.0

_RECORD = """
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', 's', ARGV[2], 'm', ARGV[3],
                      'f', ARGV[4])
redis.call('PEXPIRE', KEYS[1], ARGV[5])
if ARGV[3] ~= '' then
  local note = {o = ARGV[7], s = ARGV[2], e = id, m = ARGV[3]}
  if ARGV[4] == '1' then note['f'] = 1 end
  redis.call('PUBLISH', ARGV[6], cjson.encode(note))
end
return id
"""

# Renew a standalone stream's claim while this GET holds it, or take it again if nobody does
# (lost with a Redis restart, or lapsed while Redis was away); 0 only if another GET holds it.
_KEEP_CLAIM = """
local holder = redis.call('GET', KEYS[1])
if holder ~= ARGV[1] and (holder or ARGV[3] ~= '1') then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
# Take the claim over and tell the holder, on any worker, in one step (a failure leaves both
# undone, or both done).
_TAKE_CLAIM = """
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], cjson.encode({o = ARGV[4], s = ARGV[5], m = ARGV[1]}))
return 1
"""
_DROP_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

_KEY_RING = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1e6
local rotate, stage = tonumber(ARGV[1]), tonumber(ARGV[2])
local raw = redis.call('GET', KEYS[1])
local ring = {}
if raw then ring = cjson.decode(raw) end
local changed = false
if #ring == 0 then
  ring = {{now, ARGV[3]}}
  changed = true
elseif ring[1][1] + rotate <= now then
  table.insert(ring, 1, {now + stage, ARGV[3]})
  changed = true
end
while #ring > 3 do table.remove(ring) end
if changed then redis.call('SET', KEYS[1], cjson.encode(ring)) end
return cjson.encode({now, ring})
"""


class RedisEventLog:
    def __init__(
        self,
        client: AnyRedis,
        *,
        prefix: str,
        max_events: int = DEFAULT_MAX_EVENTS,
        retention: float = DEFAULT_RETENTION,
    ) -> None:
        self.client = client
        self.prefix = prefix
        self.max_events = max_events
        self.retention_ms = max(1, int(retention * 1000))
        self.cluster = isinstance(client, RedisCluster)

    def key(self, session_id: str) -> str:
        return event_log_key(self.prefix, session_id, cluster=self.cluster)

    async def append(
        self, session_id: str, stream: str, payload: str | None, final: bool = False
    ) -> str:
        key = self.key(session_id)
        fields: dict[Any, Any] = {"s": stream, "m": payload or "", "f": "1" if final else "0"}
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.xadd(key, fields, maxlen=self.max_events, approximate=True)
            pipe.pexpire(key, self.retention_ms)
            event_id, _ = await pipe.execute()
        return _text(event_id)

    async def after(self, session_id: str, event_id: str) -> tuple[str, list[Event]] | None:
        key = self.key(session_id)
        primed = parse_priming_id(event_id)
        if primed is not None:
            cursor, stream = primed
            if not _is_stream_id(cursor):
                return None
            later = await self.client.xrange(key, f"({cursor}", "+") or []
        elif _is_stream_id(event_id):
            async with self.client.pipeline(transaction=False) as pipe:
                pipe.xrange(key, event_id, event_id)
                pipe.xrange(key, f"({event_id}", "+")
                first, later = await pipe.execute()
            if not first:
                return None
            cursor, stream = event_id, _text(_fields(first[0][1]).get("s", ""))
        else:
            return None
        events = []
        for entry_id, raw in later or []:
            fields = _fields(raw)
            if fields.get("s") != stream:
                continue
            payload = fields.get("m") or None
            events.append(Event(stream, _text(entry_id), payload, fields.get("f") == "1"))
        return stream, events

    def anchor(self, session_id: str) -> str:
        """Redis stream ids start with Redis's clock in ms; this worker's clock, less a margin
        for skew between the two, is a cursor before anything appended from now on."""
        return f"{int(time.time() * 1000) - CLOCK_MARGIN_MS}-0"

    async def drop(self, session_id: str) -> None:
        await self.client.delete(self.key(session_id))


def _is_stream_id(text: str) -> bool:
    """A Redis stream id that something could follow (Redis refuses larger parts, and anything
    after the last id, as a malformed command rather than an unknown id)."""
    if not _EVENT_ID.fullmatch(text):
        return False
    parts = tuple(int(part) for part in text.split("-"))
    limit = 2**64 - 1
    return max(parts) <= limit and parts < (limit, limit)


class RedisRelay:
    def __init__(self, client: AnyRedis, *, prefix: str) -> None:
        self.client: Any = client
        self.cluster = isinstance(client, RedisCluster)
        self.prefix = prefix
        self.worker = new_worker_id()
        self._own = f"{prefix}w:{self.worker}"
        self._everyone = f"{prefix}workers"
        self._pubsub: Any = None
        self._listeners: dict[str, set[MemoryObjectSendStream[Event]]] = {}
        self._confirmed: dict[str, anyio.Event] = {}
        self._on_note: NoteHandler | None = None
        self._keep_claim = client.register_script(_KEEP_CLAIM)
        self._drop_claim = client.register_script(_DROP_CLAIM)
        self._take_claim = client.register_script(_TAKE_CLAIM)

    def channel(self, session_id: str) -> str:
        return f"{self.prefix}ev:{session_id}"

    def _claim_key(self, session_id: str) -> str:
        """Who holds the session's standalone stream (on a cluster, in the session's slot)."""
        if self.cluster:
            return f"{self.prefix}get:{{{session_id}}}"
        return f"{self.prefix}get:{session_id}"

    async def claim_standalone(self, session_id: str, token: str, *, take_over: bool) -> bool:
        key, ttl_ms = self._claim_key(session_id), int(CLAIM_SECONDS * 1000)
        if not take_over:
            return bool(await self.client.set(key, token, px=ttl_ms, nx=True))
        deliver(self._listeners.get(session_id), Event(OWNER_STREAM, None, token))  # (here)
        args: list[str | int] = [token, ttl_ms, self.channel(session_id), self.worker, OWNER_STREAM]
        await self._take_claim(keys=[key], args=args)
        return True

    async def keep_standalone(self, session_id: str, token: str, *, again: bool = True) -> bool:
        ttl_ms = int(CLAIM_SECONDS * 1000)
        args: list[str | int] = [token, ttl_ms, "1" if again else "0"]
        return bool(await self._keep_claim(keys=[self._claim_key(session_id)], args=args))

    async def release_standalone(self, session_id: str, token: str) -> None:
        await self._drop_claim(keys=[self._claim_key(session_id)], args=[token])

    async def start(self, on_note: NoteHandler, tasks: TaskGroup) -> None:
        self._on_note = on_note
        if self.cluster:  # a cluster subscription picks its node from the slot map: load it
            await self.client.initialize()
        self._pubsub = self.client.pubsub()
        await self._pubsub.subscribe(self._own, self._everyone)
        tasks.start_soon(self._read)

    async def aclose(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            try:
                await pubsub.aclose()
            except Exception:
                logger.debug("Relay connection did not close cleanly")

    async def _read(self) -> None:
        lost = False
        while self._pubsub is not None:
            try:
                message = await self._pubsub.get_message(timeout=1.0)
            except Exception:
                logger.warning("Relay connection lost; reconnecting")
                lost = True
                await self._start_afresh()
                await anyio.sleep(0.5)
                if self.cluster:
                    await self._resubscribe()
                continue
            if lost:  # connected again (not before: a client resuming meanwhile would get 503s)
                lost = False
                self._end_listeners()
            if message is None:
                continue
            channel = _text(message.get("channel"))
            if message.get("type") == "subscribe":
                confirmed = self._confirmed.get(channel)
                if confirmed is not None:
                    confirmed.set()
                continue
            if message.get("type") != "message":
                continue
            try:
                data = json.loads(message["data"])
            except (ValueError, TypeError):
                continue
            if not isinstance(data, dict) or data.get("o") == self.worker:
                continue
            if channel in (self._own, self._everyone):
                if self._on_note is not None:
                    try:
                        await self._on_note(data)
                    except Exception:
                        text = "A note from another worker could not be handled\n%s"
                        logger.error(text, traceback_text())
            elif channel.startswith(f"{self.prefix}ev:"):
                session_id = channel[len(self.prefix) + 3 :]
                event = Event(str(data.get("s")), data.get("e"), data.get("m"), bool(data.get("f")))
                deliver(self._listeners.get(session_id), event)

    async def _start_afresh(self) -> None:
        """A read that failed on a connection still up (a reply it could not read: bytes that
        are no UTF-8 from another publisher) would fail again at every read: the connection is
        dropped, so the next read connects and subscribes again."""
        connection = getattr(self._pubsub, "connection", None)
        if connection is not None and connection.is_connected:
            try:
                await connection.disconnect()
            except Exception:
                logger.debug("Relay connection did not close cleanly")

    def _end_listeners(self) -> None:
        """End every stream listening here, once the relay is connected again: what was
        published while it was down never arrives, and a stream waiting on would miss it for
        good (a resumed request stream its answer). Ended, its client resumes from the event
        log, which has it all."""
        for sends in list(self._listeners.values()):
            for send in list(sends):
                send.close()

    async def _resubscribe(self) -> None:
        """Cluster only: a subscription stays on its node, so when that node is gone, subscribe
        everything again on a new one (a plain or Sentinel client resubscribes by itself)."""
        old = self._pubsub
        if old is None:
            return
        channels = [self._own, self._everyone, *(self.channel(s) for s in self._listeners)]
        fresh = self.client.pubsub()
        try:
            await fresh.subscribe(*channels)
        except Exception:
            logger.debug("Relay resubscription failed; will retry")
            with anyio.CancelScope(shield=True):
                try:
                    await fresh.aclose()
                except Exception:
                    logger.debug("Relay connection did not close cleanly")
            return
        if self._pubsub is not old:  # closed meanwhile
            await fresh.aclose()
            return
        self._pubsub = fresh
        try:
            await old.aclose()
        except Exception:
            logger.debug("Relay connection did not close cleanly")

    async def to_worker(self, worker: str, note: Note) -> None:
        await self.client.publish(f"{self.prefix}w:{worker}", json.dumps(note))

    async def to_all(self, note: Note) -> None:
        await self.client.publish(self._everyone, json.dumps({**note, "o": self.worker}))

    def deliver_here(self, session_id: str, event: Event) -> None:
        deliver(self._listeners.get(session_id), event)

    async def publish(self, session_id: str, event: Event) -> None:
        deliver(self._listeners.get(session_id), event)
        data: dict[str, Any] = {
            "o": self.worker,
            "s": event.stream,
            "e": event.event_id,
            "m": event.payload,
        }
        if event.final:
            data["f"] = 1
        await self.client.publish(self.channel(session_id), json.dumps(data))

    @asynccontextmanager
    async def listen(self, session_id: str) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        send, receive = anyio.create_memory_object_stream[Event](LISTENER_BUFFER)
        listeners = self._listeners.setdefault(session_id, set())
        first = not listeners
        listeners.add(send)
        channel = self.channel(session_id)
        confirmed: anyio.Event | None = None
        try:
            if self._pubsub is not None:
                # Whatever is read from the event log after the subscription is confirmed was
                # either logged before, or will arrive here: nothing falls between the two. A
                # listener joining while the first one's subscription is pending waits for it too.
                confirmed = self._confirmed.get(channel)
                if first:
                    confirmed = self._confirmed[channel] = anyio.Event()
                    await self._pubsub.subscribe(channel)
                if confirmed is not None:
                    with anyio.move_on_after(SUBSCRIBE_TIMEOUT):
                        await confirmed.wait()
                if first:
                    self._confirmed.pop(channel, None)
            yield receive
        finally:
            if first and confirmed is not None and self._confirmed.get(channel) is confirmed:
                del self._confirmed[channel]  # (a subscription that failed or was cut short)
            listeners.discard(send)
            if not listeners:
                self._listeners.pop(session_id, None)
                if self._pubsub is not None:
                    with anyio.CancelScope(shield=True):
                        try:
                            await self._pubsub.unsubscribe(channel)
                        except Exception:
                            logger.debug("Relay unsubscribe failed")
            send.close()
            receive.close()


class RedisBackplane:
    def __init__(
        self,
        client: AnyRedis,
        *,
        prefix: str,
        max_events: int = DEFAULT_MAX_EVENTS,
        retention: float = DEFAULT_RETENTION,
        key_rotation: float = KEY_ROTATION,
    ) -> None:
        self.events = RedisEventLog(
            client, prefix=prefix, max_events=max_events, retention=retention
        )
        self.relay = RedisRelay(client, prefix=prefix)
        self._ring = client.register_script(_KEY_RING)
        self._record = client.register_script(_RECORD)
        self._ring_key = f"{prefix}request-state-keys"
        self.key_rotation = key_rotation

    async def record(self, session_id: str, event: Event) -> Event:
        """Append, expire and publish in one script: one round trip per event."""
        log, relay = self.events, self.relay
        args: list[str | int] = [
            log.max_events,
            event.stream,
            event.payload or "",
            "1" if event.final else "0",
            log.retention_ms,
            relay.channel(session_id),
            relay.worker,
        ]
        event_id = _text(await self._record(keys=[log.key(session_id)], args=args))
        logged = Event(event.stream, event_id, event.payload, event.final)
        if event.payload is not None:
            relay.deliver_here(session_id, logged)
        return logged

    async def request_state_keys(self) -> list[bytes]:
        reply = await self._ring(
            keys=[self._ring_key],
            args=[repr(self.key_rotation), repr(KEY_STAGING), secrets.token_hex(32)],
        )
        now, ring = json.loads(_text(reply))
        active = [bytes.fromhex(key) for since, key in ring if since <= now]
        staged = [bytes.fromhex(key) for since, key in ring if since > now]
        return [*active, *staged]


def _fields(raw: Any) -> dict[str, str]:
    return {_text(k): _text(v) for k, v in dict(raw).items()}


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
