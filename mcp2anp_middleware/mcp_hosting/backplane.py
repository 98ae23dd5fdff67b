"""What the workers serving one session share besides its record: events and messages.

A session's requests may reach any worker, so three things cross worker boundaries:

- **Events** (:class:`EventLog`): every message written to a resumable SSE stream is appended to
  the session's log first, so a client that lost a stream resumes it with ``Last-Event-ID`` on
  any worker. Logs are bounded (``max_events``), kept ``retention`` seconds after their last
  event, and dropped when their session ends.
- **Live events** (:class:`Relay.publish` / :meth:`Relay.listen`): a message for a stream that is
  not open on the worker producing it (the standalone GET stream, or a request stream being
  resumed elsewhere) goes to whichever worker holds that stream.
- **Notes** (:meth:`Relay.to_worker` / :meth:`Relay.to_all`): a client's answer to a
  server→client request goes to the worker whose request waits for it (its id names the worker);
  a cancellation goes to every worker, since any may run the request it cancels.

:class:`LocalBackplane` is all of this within one process (the memory store);
:mod:`~mcp2anp_middleware.mcp_hosting.redis_backplane` is the same over Redis Streams and pub/sub.
"""

from __future__ import annotations

import re
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Protocol

import anyio
from anyio.abc import TaskGroup
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

Note = dict[str, Any]
"""A message between workers: JSON-safe, always with ``"s"`` (the session id)."""

NoteHandler = Callable[[Note], Awaitable[None]]

DEFAULT_MAX_EVENTS = 1000
DEFAULT_RETENTION = 300.0
LISTENER_BUFFER = 64
KEEPALIVE_SECONDS = 15.0
"""A comment line this often keeps idle streams alive through proxies and load balancers."""
CLAIM_SECONDS = 3 * KEEPALIVE_SECONDS
"""How long a claim on a session's standalone stream outlives its last renewal (its holder
renews it every 15 to 30 s while the stream is open): a worker that died holding one blocks a
fresh GET that long at most (a GET resuming the stream takes it over at once)."""
STANDALONE = "_GET_stream"
"""The stream of messages tied to no request: the session's GET stream."""
OWNER_STREAM = "_GET_owner"
"""A live event on this pseudo-stream names (payload) the GET that holds the session's
standalone stream from now on: a standalone stream of any other token ends."""


class Event(NamedTuple):
    """One SSE event of a session: ``payload`` is the JSON-RPC message's JSON text, or None for
    a priming event (an id the client can resume from, before anything else was sent).

    A named tuple (immutable, made in one step): one or two are made for every request."""

    stream: str
    event_id: str | None
    payload: str | None
    final: bool = False
    """The stream's response: nothing follows it on this stream."""


class EventLog(Protocol):
    async def append(
        self, session_id: str, stream: str, payload: str | None, final: bool = False
    ) -> str:
        """Store an event and return its id."""
        ...

    async def after(self, session_id: str, event_id: str) -> tuple[str, list[Event]] | None:
        """The stream ``event_id`` belongs to and that stream's later events, oldest first; None
        when the id is unknown to this session (never sent, trimmed, or expired). A priming id
        (:func:`priming_id`) names its stream itself."""
        ...

    def anchor(self, session_id: str) -> str:
        """A cursor no later than any event appended to the session's log from now on: with
        :func:`priming_id`, a priming event needs no write."""
        ...

    async def drop(self, session_id: str) -> None: ...


class Relay(Protocol):
    worker: str
    """This worker's id: the prefix of the ids of the requests it sends to clients."""

    async def start(self, on_note: NoteHandler, tasks: TaskGroup) -> None: ...

    async def aclose(self) -> None: ...

    async def to_worker(self, worker: str, note: Note) -> None: ...

    async def to_all(self, note: Note) -> None:
        """Deliver ``note`` to every other worker."""
        ...

    async def publish(self, session_id: str, event: Event) -> None:
        """Deliver a live event to whoever listens to the session, on any worker."""
        ...

    def listen(self, session_id: str) -> Listening: ...

    async def claim_standalone(self, session_id: str, token: str, *, take_over: bool) -> bool:
        """Hold the session's standalone stream for the GET ``token`` on every worker: False
        when another GET holds it (unless ``take_over``, which tells the holder to end, with an
        :data:`OWNER_STREAM` event). No message then goes on two streams."""
        ...

    async def keep_standalone(self, session_id: str, token: str, *, again: bool = True) -> bool:
        """Renew the claim of an open stream; False when another GET holds it. A claim lost
        (lapsed, or gone with a Redis restart) is taken again, unless ``again`` is off: then
        False too (this GET was taken over, and the GET that did has ended since)."""
        ...

    async def release_standalone(self, session_id: str, token: str) -> None: ...


Listening = Any  # an async context manager yielding a MemoryObjectReceiveStream[Event]


class Backplane(Protocol):
    @property
    def events(self) -> EventLog: ...

    @property
    def relay(self) -> Relay: ...

    async def request_state_keys(self) -> list[bytes]:
        """The keys sealing session-less request state, the sealing one first."""
        ...

    async def record(self, session_id: str, event: Event) -> Event:
        """Log ``event`` (without an id yet), then publish it to whoever follows its stream;
        returns it with its id. One step, so a follower that subscribed before reading the log
        misses nothing (and with Redis, one round trip)."""
        ...


def new_worker_id() -> str:
    return secrets.token_hex(5)


_LOG_STREAM = re.compile(r"^[0-9a-f]{10}\.\d{1,18}\.\d{1,18}$")


def priming_id(anchor: str, stream: str) -> str:
    """The id of a request stream's priming event: the log's cursor when the stream opened and
    the stream's log name (``worker.instance.n``, never client text). Resuming from it replays
    the stream's events after the cursor; nothing is written for it."""
    return f"{anchor}~{stream}"


def wire_event(event: Event) -> Event:
    """``event`` as its client sees it: the id names the event's stream as a priming id does
    (the log's id as the cursor, the stream's log name), so a resume from it finds the stream
    even once the log has let the event go (expired or trimmed). Before, such an id was unknown:
    the GET ended at once, and a client reconnecting its standalone stream with it did so every
    second for good, losing every later message. Ids a client sent earlier still resume."""
    if event.event_id is None or "~" in event.event_id:
        return event
    return event._replace(event_id=priming_id(event.event_id, event.stream))


def _number(text: str) -> bool:
    """ASCII digits, not too many for ``int()`` (``str.isdigit`` is also true of ``"²"``, which
    ``int()`` refuses): a client's ``Last-Event-ID`` is read with it."""
    return text.isascii() and text.isdigit() and len(text) <= 30


def parse_priming_id(event_id: str) -> tuple[str, str] | None:
    """The cursor and stream a priming id names: a request stream's log name, or the session's
    standalone stream (:data:`STANDALONE`, whose priming id resumes, and takes over, the GET)."""
    anchor, sep, stream = event_id.partition("~")
    if not sep or not (stream == STANDALONE or _LOG_STREAM.fullmatch(stream)):
        return None
    return anchor, stream


@dataclass(slots=True)
class _Log:
    events: deque[Event]
    seq: int = 0
    touched: float = 0.0


@dataclass
class MemoryEventLog:
    """Events in process memory, bounded per session and forgotten ``retention`` seconds after a
    session's last event; O(1) per append (the oldest logs are purged as new events come)."""

    max_events: int = DEFAULT_MAX_EVENTS
    retention: float = DEFAULT_RETENTION
    clock: Callable[[], float] = time.monotonic
    _logs: OrderedDict[str, _Log] = field(default_factory=OrderedDict)
    _seq: int = field(default_factory=lambda: time.time_ns() // 1000)
    """Starts at the wall clock's microseconds, not 0: a session restored from a state file
    after a restart is resumed from ids of the process before, and the events logged since
    must come after them."""

    async def append(
        self, session_id: str, stream: str, payload: str | None, final: bool = False
    ) -> str:
        now = self.clock()
        self._purge(now)
        log = self._logs.pop(session_id, None)
        if log is None:
            log = _Log(deque(maxlen=self.max_events))
        self._logs[session_id] = log  # most recently touched last
        self._seq += 1  # one counter for every log: a log purged and begun again goes on from it
        log.seq = self._seq
        log.touched = now
        event_id = str(log.seq)
        log.events.append(Event(stream, event_id, payload, final))
        return event_id

    async def after(self, session_id: str, event_id: str) -> tuple[str, list[Event]] | None:
        self._purge(self.clock())
        log = self._logs.get(session_id)
        primed = parse_priming_id(event_id)
        if primed is not None:
            anchor, stream = primed
            if not _number(anchor):
                return None
            seq = int(anchor)
        elif _number(event_id):
            seq = int(event_id)
            found = (
                next((e.stream for e in log.events if e.event_id == event_id), None)
                if log
                else None
            )
            if found is None:
                return None
            stream = found
        else:
            return None
        later = [
            e
            for e in (log.events if log else ())
            if e.stream == stream and int(e.event_id or 0) > seq
        ]
        return stream, later

    def anchor(self, session_id: str) -> str:
        return str(self._seq)

    async def drop(self, session_id: str) -> None:
        self.drop_now(session_id)

    def drop_now(self, session_id: str) -> None:
        """:meth:`drop` without awaiting (nothing to wait for in memory)."""
        self._logs.pop(session_id, None)

    def _purge(self, now: float) -> None:
        while self._logs:
            session_id, log = next(iter(self._logs.items()))
            if now - log.touched < self.retention:
                return
            del self._logs[session_id]


class LocalRelay:
    """The relay of a single process: live events reach this process's listeners; there is no
    other worker to send notes to."""

    def __init__(self) -> None:
        self.worker = new_worker_id()
        self._listeners: dict[str, set[MemoryObjectSendStream[Event]]] = {}
        self._on_note: NoteHandler | None = None

    async def start(self, on_note: NoteHandler, tasks: TaskGroup) -> None:
        self._on_note = on_note

    async def aclose(self) -> None:
        self._on_note = None

    async def to_worker(self, worker: str, note: Note) -> None:
        if worker == self.worker and self._on_note is not None:
            await self._on_note(note)

    async def to_all(self, note: Note) -> None:
        return None

    async def publish(self, session_id: str, event: Event) -> None:
        deliver(self._listeners.get(session_id), event)

    # One process: the endpoint's own table of open streams is every worker's.
    async def claim_standalone(self, session_id: str, token: str, *, take_over: bool) -> bool:
        return True

    async def keep_standalone(self, session_id: str, token: str, *, again: bool = True) -> bool:
        return True

    async def release_standalone(self, session_id: str, token: str) -> None:
        return None

    @asynccontextmanager
    async def listen(self, session_id: str) -> AsyncIterator[MemoryObjectReceiveStream[Event]]:
        send, receive = anyio.create_memory_object_stream[Event](LISTENER_BUFFER)
        listeners = self._listeners.setdefault(session_id, set())
        listeners.add(send)
        try:
            yield receive
        finally:
            listeners.discard(send)
            if not listeners:
                self._listeners.pop(session_id, None)
            send.close()
            receive.close()


def deliver(listeners: set[MemoryObjectSendStream[Event]] | None, event: Event) -> None:
    """Hand ``event`` to each listener without waiting. A listener too far behind is closed:
    its stream ends, and its client resumes from the event log, which has every event."""
    for listener in list(listeners or ()):
        try:
            listener.send_nowait(event)
        except anyio.WouldBlock:
            listener.close()
        except (anyio.BrokenResourceError, anyio.ClosedResourceError):
            pass


@dataclass
class LocalBackplane:
    """One process: events in memory, a relay to itself, a request-state key of its own."""

    events: EventLog = field(default_factory=MemoryEventLog)
    relay: Relay = field(default_factory=LocalRelay)
    _key: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    async def request_state_keys(self) -> list[bytes]:
        return [self._key]

    async def record(self, session_id: str, event: Event) -> Event:
        event_id = await self.events.append(session_id, event.stream, event.payload, event.final)
        logged = Event(event.stream, event_id, event.payload, event.final)
        if event.payload is not None:
            await self.relay.publish(session_id, logged)
        return logged
