"""This process's sessions: live objects over a store of records, one code path for every store.

The store (memory or Redis) holds records only. In front of it the registry keeps:

- a bounded cache of live :class:`SessionState` objects, least recently used first; an entry
  evicted from it is rebuilt from its record at the session's next request;
- an in-flight map: a session with a request in flight never expires (the sweep pushes its
  deadline on), and its idle time counts from the end of the last request;
- the expiry rule, written once in :meth:`SessionRegistry.deadline`: the earlier of last use plus
  the idle timeout and creation plus the maximum age.

A shared store is written at most once per ``touch_interval`` per session, so another process's
copy of ``last_used`` may lag by that much: a session counts as expired only ``touch_interval``
after its deadline (zero with the memory store). Every change is reported as a
:class:`~.session_events.SessionEvent`.
"""

from __future__ import annotations

import asyncio
import heapq
import inspect
import math
import sys
import time
import weakref
from collections import Counter, OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field, replace
from typing import Any

import anyio

from mcp2anp_middleware.cancel_scope import cancel_and_wait, cancel_scope
from mcp2anp_middleware.logging_setup import HotPathLogger, exception_fields
from mcp2anp_middleware.sessions.clock import Clock, system_clock
from mcp2anp_middleware.sessions.events import (
    SessionEvent,
    SessionEventKind,
    SessionEvents,
    SessionListener,
)
from mcp2anp_middleware.sessions.ids import implicit_session_id, new_session_id, short_id
from mcp2anp_middleware.sessions.loop_slice import LoopSlice
from mcp2anp_middleware.sessions.state import NEVER, SessionConfig, SessionState
from mcp2anp_middleware.sessions.stores.base import (
    CapExceeded,
    Caps,
    SessionGone,
    SessionRecord,
    SessionStore,
    StoreUnavailable,
    UnconfirmedCommit,
)
from mcp2anp_middleware.sessions.stores.memory import InMemorySessionStore

logger = HotPathLogger("mcp2anp_middleware.sessions")  # per-session lines: bound once

_RETRY_FIRST = 0.1
_RETRY_MAX = 2.0
_RETRY_SETTLE = 1.0
DEFAULT_LIVE_CACHE = 100_000
"""Live objects kept per process (least recently used beyond it are rebuilt when used again)."""
MAX_DURATION = 10 * 365 * 86400.0
"""Longest timeout or age accepted (ten years): stores turn them into integer TTLs."""


class ShuttingDown(Exception):
    """New sessions are refused while the server drains (answered 503)."""


@dataclass(frozen=True, slots=True)
class SessionInfo:
    """One session as the admin API lists it: never the whole id."""

    short_id: str
    principal: str
    created_at: float
    last_used: float
    expires_at: float
    implicit: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.short_id,
            "principal": self.principal,
            "created_at": self.created_at,
            "last_used": self.last_used,
            "expires_at": self.expires_at,
            "implicit": self.implicit,
        }


@dataclass
class RegistryStats:
    created: int = 0
    removed: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    sweeps: int = 0
    last_sweep_seconds: float = 0.0
    max_sweep_seconds: float = 0.0
    total_sweep_seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "created": self.created,
            "removed": dict(self.removed),
            "rejected": dict(self.rejected),
            "sweeps": self.sweeps,
            "last_sweep_seconds": self.last_sweep_seconds,
            "max_sweep_seconds": self.max_sweep_seconds,
            "total_sweep_seconds": self.total_sweep_seconds,
        }


def _check_duration(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Refuse NaN, infinities and out-of-range durations at construction, not at first use."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = "a finite number of seconds" + ("" if allow_zero else " above 0")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if value > MAX_DURATION:
        raise ValueError(f"{name} must be at most {MAX_DURATION:g} seconds, got {value!r}")


class SessionRegistry:
    def __init__(
        self,
        *,
        store: SessionStore | None = None,
        session_timeout: float = 1800.0,
        max_session_age: float | None = None,
        clock: Clock = system_clock,
        touch_interval: float | None = None,
        per_principal_cap: int | None = None,
        global_cap: int | None = None,
        evict_oldest: bool = False,
        live_cache: int = DEFAULT_LIVE_CACHE,
        lease: float = 0.0,
    ) -> None:
        _check_duration("session_timeout", session_timeout)
        if max_session_age is not None:
            _check_duration("max_session_age", max_session_age)
        if touch_interval is not None:
            _check_duration("touch_interval", touch_interval, allow_zero=True)
        self.store: SessionStore = store if store is not None else InMemorySessionStore()
        self.session_timeout = session_timeout
        self.max_session_age = max_session_age
        self.clock = clock
        self.touch_interval = (
            self.store.default_touch_interval if touch_interval is None else touch_interval
        )
        self.caps = Caps(per_principal_cap, global_cap, evict_oldest)
        self.live_cache = max(1, live_cache)
        self.lease = lease
        """Least a busy session's store record is kept for (the sweep renews it): the middleware
        sets twice the cleanup interval, so a lease never lapses between two sweeps."""
        _check_store(self.store)
        self._in_place: bool = getattr(self.store, "writes_in_place", False)
        """The store's writes complete without suspending (the memory store): no ordering."""
        if self._in_place:
            self.store.use()  # type: ignore[attr-defined]
        self.recheck: float = getattr(self.store, "recheck", 0.0)
        """Seconds a lookup trusts the store's last word on a session this process holds, while
        it follows the store's notices of ended sessions (see :meth:`get`)."""
        self.following = False
        """Whether the store's notices are followed now, with no gap since the confirmations
        held (each new subscription forgets every earlier confirmation)."""
        self._notices = 0
        """Notices received so far (a read that saw one arrive confirms nothing)."""
        self.events = SessionEvents()
        self.stats = RegistryStats()
        self.accepting = True
        # Least recently used first. An OrderedDict, not a plain dict re-inserted on use: a plain
        # dict leaves a deleted slot at every entry moved or dropped, and finding its first entry
        # walks over those at its front, so with the cache full every new session (which drops
        # the oldest) walked further, up to milliseconds, until the dict happened to be resized.
        # About 50 bytes more per live object.
        self._live: OrderedDict[str, SessionState] = OrderedDict()
        self._by_age: list[tuple[float, str]] = []
        """With a maximum age: a heap of (when each live object's session reaches it, its id),
        since the order of use does not find a busy session past its age (see
        :meth:`_sweep_live`). Entries of objects dropped since are skipped when they come due."""
        # Keyed by the object, not the id: an implicit id can name a new session while a request
        # of the earlier one is still running.
        self._busy: dict[int, SessionState] = {}
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._uncommitted: weakref.WeakSet[SessionState] = weakref.WeakSet()
        """Implicit sessions created and not committed yet (see :meth:`awaiting_commit`)."""
        self._removing: dict[str, float] = {}
        """Refused creations whose record is being removed (id: creation time); see
        :meth:`_abandon_removing`."""
        self._commits: dict[int, asyncio.Future[None]] = {}
        """Commits whose store write is under way, by session object (one at a time)."""
        self._compensations: set[asyncio.Task[None]] = set()
        self._writes: dict[int, asyncio.Future[None]] = {}

    # -- the expiry rule ------------------------------------------------------------------------

    def deadline(self, state: SessionState | SessionRecord) -> float:
        """When the session expires if nothing uses it again: the one expiry rule (inline in
        :meth:`_written_deadline` too: this one runs twice per request)."""
        last = state.last_accessed if isinstance(state, SessionState) else state.last_used
        deadline = last + self.session_timeout
        if self.max_session_age is not None:
            deadline = min(deadline, state.created_at + self.max_session_age)
        return deadline

    def _written_deadline(self, state: SessionState) -> float:
        """The earliest the store may drop ``state``'s record, by what was last written of it
        (a use begun since is not written yet; a lease written may keep it longer): the rule of
        :meth:`deadline` from the last write."""
        deadline = state.synced_at + self.session_timeout
        if self.max_session_age is not None:
            deadline = min(deadline, state.created_at + self.max_session_age)
        return deadline

    def _expired(self, state: SessionState, now: float, stored_until: float = 0.0) -> str | None:
        """Why ``state`` is over at ``now`` (``"expired"``, ``"max_age"``), or None.

        An idle session is over past its deadline plus the write tolerance, and past what the
        store was last told to keep it for (``stored_until``: another process's lease while a
        request runs there); a busy one only past its maximum age, and then only for new requests
        (its running ones finish)."""
        if self.max_session_age is not None and now > state.created_at + self.max_session_age:
            return "max_age"
        keep_until = max(self.deadline(state) + self.touch_interval, stored_until)
        if not state.in_flight and now > keep_until:
            return "expired"
        return None

    def _leased(self, state: SessionState, renew: bool) -> bool:
        """Whether a write now gives the record a lease instead of its idle deadline: a sweep
        renewing a busy session, or any write while busy when sweeps are too rare for the idle
        deadline to outlast the gap until the next one."""
        return bool(state.in_flight) and (renew or self.lease > self.session_timeout)

    def _keep_until(self, state: SessionState, now: float, *, renew: bool = False) -> float:
        """The latest moment the store must still hold the session: its deadline (a busy one's
        lease: at least an idle timeout from now, renewed by the sweep; past its maximum age it
        is refused to new requests and removed when the last running one ends) plus the write
        tolerance."""
        until = self.deadline(state)
        if self._leased(state, renew):
            until = max(until, now + max(self.session_timeout, self.lease))
        return until + self.touch_interval

    def _record(
        self, state: SessionState, now: float, *, renew: bool = False
    ) -> tuple[SessionRecord, float]:
        """The record to write for ``state`` and its TTL in seconds from ``now``."""
        keep_until = self._keep_until(state, now, renew=renew)
        record = SessionRecord(
            session_id=state.session_id,
            principal=state.principal,
            created_at=state.created_at,
            last_used=state.last_accessed,
            expires_at=keep_until,
            implicit=state.implicit,
            handshake=state.handshake,
        )
        return record, max(keep_until - now, 0.001)

    # -- local view -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Live objects this process holds."""
        return len(self._live)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._live

    def live_sessions(self) -> list[SessionState]:
        """The live objects this process holds, least recently used first."""
        return list(self._live.values())

    def subscribe(self, listener: SessionListener) -> Callable[[], None]:
        """Call ``listener`` with every :class:`SessionEvent`; returns the unsubscribe function."""
        return self.events.subscribe(listener)

    @property
    def in_flight(self) -> int:
        return sum(state.in_flight for state in self._busy.values())

    async def wait_idle(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for in-flight requests to end; True if they did."""
        if not self._busy:
            return True
        # A future on the running loop (not an Event), so one middleware can serve several loops.
        waiter = asyncio.get_running_loop().create_future()
        self._idle_waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, grace)
        except TimeoutError:
            return False
        finally:
            if waiter in self._idle_waiters:
                self._idle_waiters.remove(waiter)
        return True

    # -- creation -------------------------------------------------------------------------------

    def new_session(self, config: SessionConfig) -> SessionState:
        """A session not yet in the store; :meth:`register` reserves it."""
        return SessionState(new_session_id(), config, created_at=self.clock())

    async def register(
        self, state: SessionState, *, reservation: float | None = None, pending: bool = False
    ) -> None:
        """Reserve ``state`` in the store (caps apply); :meth:`commit` or :meth:`discard` it.

        With ``reservation`` the store keeps the record only that long unless :meth:`commit`
        extends it, so a creation the store carries out after its request was refused (a stalled
        Redis running the script late) lapses by itself instead of counting against the caps for
        a whole idle timeout. ``pending`` (an implicit session) keeps the whole lifetime but
        still awaits its commit. Without either (a restored session) it counts at once.

        A creation awaiting its commit evicts nothing (with ``evict_oldest``): the commit does,
        so a refused request costs its principal no session (see ``SessionStore.create``).
        """
        if not self.accepting:
            raise ShuttingDown("server is shutting down; no new sessions")
        if pending:
            self._uncommitted.add(state)
        now = self.clock()
        record, ttl = self._record(state, now)
        if reservation is not None:
            ttl = min(ttl, reservation)
        awaits_commit = pending or reservation is not None
        caps = self.caps
        try:
            try:
                outcome = await self.store.create(
                    record, ttl=ttl, now=now, caps=caps, pending=awaits_commit
                )
            except CapExceeded:
                # Stores without native expiry may still count sessions past their deadline:
                # expire those, then try again. A session a request still runs on is never
                # expired under it: first renewed, as the sweep renews it (past its maximum age
                # it goes when its last request ends).
                for busy in list(self._busy.values()):
                    if self._written_deadline(busy) + self.touch_interval <= now:
                        await self._sync(busy, force=True, renew=True)
                if not await self._expire_store(now):
                    raise
                outcome = await self.store.create(
                    record, ttl=ttl, now=now, caps=caps, pending=awaits_commit
                )
        except StoreUnavailable as exc:
            await self.discard(state)  # the store may still carry the creation out later
            if isinstance(exc, UnconfirmedCommit) and exc.evicted:
                self._end_evicted(exc.evicted)  # gone all the same
                await self._announce_evicted(exc.evicted)
            raise
        except CapExceeded:
            raise  # nothing was made
        except BaseException:  # cancelled (a host's timeout, a server's forced stop) mid-write
            self.discard_later(state)  # the store may have made it, or may make it yet
            raise
        if not outcome.created:
            self._uncommitted.discard(state)  # nothing of it was made: nothing to discard
            raise KeyError("session id already exists")
        state.synced_at = state.last_accessed
        state.reserved = reservation is not None
        self._cache(state)  # before anything awaits: a concurrent lookup finds this object
        if outcome.evicted:  # (only a creation that counts at once evicts: a restored one)
            self._end_evicted(outcome.evicted)
            await self._announce_evicted(outcome.evicted)

    async def commit(self, state: SessionState) -> None:
        """The session's creating request succeeded: it now counts, and its id may be shown.

        A reservation is first extended to the full lifetime; if the store cannot confirm that
        this raises (:class:`StoreUnavailable` when unreachable; :class:`SessionGone` when the
        record is gone: the reservation lapsed, or the session was revoked or expired meanwhile)
        and the caller refuses the request instead of handing out an id the store may not keep.
        With ``evict_oldest`` the commit evicts for the session (never earlier: a refused
        request costs its principal nothing); an anyio cancellation of the request (a host's
        timeout, a client gone) does not cut the store write short once sent, so what it evicted
        is ended and announced (a native ``task.cancel()`` still can: a server's forced stop).
        A memory store only this registry uses keeps no reservation: there the record is only
        checked (still there, not revoked or expired meanwhile), and the write that ends the
        creating request carries what changed since the creation (the handshake).

        An implicit session may have several requests that could commit it (they began before
        it was committed): the first to be served does; for the others this does nothing.
        """
        under_way = self._commits.get(id(state))
        if under_way is not None:  # another of its requests is committing it: the same outcome
            await asyncio.shield(under_way)
            return
        pending = state.implicit and state in self._uncommitted  # (only implicit ones are)
        evicted: tuple[SessionRecord, ...] = ()
        if not state.reserved and not pending:
            if state.implicit:
                return  # committed already, by another of its requests
        elif self._sole_user():
            # This store keeps no reservation (a record's deadline is only what this registry
            # reads when it expires records): the commit has nothing to extend, only to confirm
            # that the record is still there, and to make it its principal's most recently
            # used, as a write would. What changed since the creation (the handshake) goes with
            # the write that ends this request, made regardless of the touch interval (the
            # record was never synced since).
            store: Any = self.store
            evicted = store.commit_now(state.session_id, state.created_at, self.caps)
            if evicted is None:
                raise SessionGone("session gone before its commit (revoked, expired)")
            self._uncommitted.discard(state)
            if state.reserved:
                state.reserved = False
                state.synced_at = NEVER
        else:
            # Written as the committing request holds it: with a lease (a request that ran
            # longer than the idle timeout must not have its session written already expired).
            now = self.clock()
            record, ttl = self._record(state, now, renew=True)
            notices = self._notices
            under_way = self._commits[id(state)] = asyncio.get_running_loop().create_future()
            try:
                # Not cut short once sent: the store may carry it out (and evict) all the same.
                with cancel_scope(shield=True):
                    outcome = await self.store.commit(record, ttl=ttl, now=now, caps=self.caps)
                if not outcome.committed:
                    raise SessionGone("session gone before its commit (lapsed, removed)")
            except BaseException as exc:
                failed = exc if isinstance(exc, Exception) else StoreUnavailable("commit cut short")
                under_way.set_exception(failed)
                under_way.exception()  # (retrieved: nobody may be waiting for it)
                if isinstance(exc, UnconfirmedCommit) and exc.evicted:
                    self._end_evicted(exc.evicted)  # gone all the same
                    with cancel_scope(shield=True):
                        await self._announce_evicted(exc.evicted)
                raise
            else:
                under_way.set_result(None)
            finally:
                del self._commits[id(state)]
            evicted = outcome.evicted
            self._uncommitted.discard(state)
            state.reserved = False
            state.synced_at = state.last_accessed
            state.leased = self._leased(state, renew=True)
            self._confirm(state, notices, now)  # the store's word, as a read's
        self.stats.created += 1
        logger.info(
            "Session created",
            session_id=short_id(state.session_id),
            total_sessions=len(self),
            implicit=state.implicit,
        )
        self._emit(SessionEventKind.CREATED, state.session_id, state.principal, state)
        if evicted:
            self._end_evicted(evicted)
            # The store holds the commit: telling the other processes is not to be cut short
            # (the request may be cancelled now), or they would serve the victims up to a
            # ``recheck`` longer.
            with cancel_scope(shield=True):
                await self._announce_evicted(evicted)

    def _end_evicted(self, victims: tuple[SessionRecord, ...]) -> None:
        """Sessions the store removed to make room: ended here (see :meth:`_announce_evicted`)."""
        for victim in victims:
            self.stats.removed["evicted"] += 1
            logger.info("Session removed", session_id=short_id(victim.session_id), reason="evicted")
            self._ended(victim.session_id, SessionEventKind.EVICTED, victim)

    async def _announce_evicted(self, victims: tuple[SessionRecord, ...]) -> None:
        """Tell the other processes of sessions evicted here."""
        for victim in victims:
            await self._announce(victim.session_id, SessionEventKind.EVICTED)

    def awaiting_commit(self, state: SessionState) -> bool:
        """An implicit session created by a request that has not been served yet: any of its
        requests may still commit it, or, refused and last to end, discard it."""
        return state in self._uncommitted

    def abandon(self, state: SessionState) -> None:
        """A creating request failed: forget it here; :meth:`discard` removes it from the store.
        Synchronous so it holds even when the request is being cancelled."""
        if self._live.get(state.session_id) is state:
            del self._live[state.session_id]
        state.closed = True

    async def discard(self, state: SessionState) -> None:
        """Remove a refused creation from the store, leaving no trace of the request.

        The delete is fenced to this very record (``created_at``), so it never removes a later
        session with the same id. If the store is unreachable the delete is retried in the
        background until it lands: a stalled store may still carry out the creation after the
        client had its answer, and that record must not outlive the stall.
        """
        if self._still_wanted(state):
            return
        self._abandon_removing(state)
        try:
            with anyio.CancelScope(shield=True):
                await self.store.remove(state.session_id, created_at=state.created_at)
        except BaseException as exc:  # unreachable, or cut short (a native cancel): retried
            self._retry_in_background(state.session_id, state.created_at)
            if not isinstance(exc, StoreUnavailable):
                raise
        else:
            self._removed(state.session_id, state.created_at)

    def discard_later(self, state: SessionState) -> None:
        """:meth:`discard` for a creating request being cancelled inside a store call: nothing
        is awaited (the cancellation goes on at once); the fenced delete runs in the background
        until the store confirms it, as after an outage, since the store may still carry out
        the creation it was sent."""
        if self._still_wanted(state):
            return
        self._abandon_removing(state)
        self._retry_in_background(state.session_id, state.created_at, first_delay=0.0)

    def _abandon_removing(self, state: SessionState) -> None:
        """:meth:`abandon`, and until the store confirms the removal, a lookup here takes that
        record as gone: no request is served on a session about to be deleted (the principal's
        next request of an implicit session is refused as the session being replaced)."""
        self.abandon(state)
        self._removing[state.session_id] = state.created_at

    def _removed(self, session_id: str, created_at: float) -> None:
        if self._removing.get(session_id) == created_at:
            del self._removing[session_id]

    def _still_wanted(self, state: SessionState) -> bool:
        """A refused creation that must stay: an implicit session another request still uses,
        or one committed since."""
        return bool(state.in_flight) or (state.implicit and state not in self._uncommitted)

    async def settle(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for background compensations, then cancel the rest (the
        reservation or the TTL removes what they could not); True when all finished."""
        pending = set(self._compensations)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
            for task in pending:
                task.cancel()
        return not pending

    def _retry_in_background(
        self, session_id: str, created_at: float, *, first_delay: float = _RETRY_FIRST
    ) -> None:
        retry = self._retry_delete(session_id, created_at, first_delay)
        task = asyncio.get_running_loop().create_task(retry)
        self._compensations.add(task)
        task.add_done_callback(self._compensations.discard)

    async def _retry_delete(self, session_id: str, created_at: float, first_delay: float) -> None:
        try:
            await self._delete_until_confirmed(session_id, created_at, first_delay)
        finally:
            self._removed(session_id, created_at)

    async def _delete_until_confirmed(
        self, session_id: str, created_at: float, first_delay: float
    ) -> None:
        """Delete until the store answers, then once more after a pause: a creation still queued
        behind the stall runs before a later request of ours, but not always before the first."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self.session_timeout + self.touch_interval
        delay, confirmations = first_delay, 0
        while confirmations < 2 and loop.time() < give_up:
            await asyncio.sleep(delay)
            try:
                deleted = await self.store.remove(session_id, created_at=created_at)
            except StoreUnavailable:
                delay = min(max(delay * 2, _RETRY_FIRST), _RETRY_MAX)
                continue
            if deleted:
                logger.info(
                    "Refused session removed from the store afterwards",
                    session_id=short_id(session_id),
                )
                return
            confirmations += 1
            delay = _RETRY_SETTLE

    async def implicit_session(self, config: SessionConfig) -> tuple[SessionState, bool]:
        """The principal's one session-less-era session, and whether this call created it.

        A created session is the caller's to :meth:`commit` (its request was served) or
        :meth:`discard` (its request was refused), and so is one found still uncommitted
        (:meth:`awaiting_commit`: a request that created it is still running).
        """
        session_id = implicit_session_id(config.principal)
        state = await self.get(session_id, config, implicit=True)
        if state is not None:
            return state, False
        state = SessionState(session_id, config, created_at=self.clock(), implicit=True)
        try:
            await self.register(state, pending=True)
        except KeyError:  # another request or process created it first
            existing = await self.get(session_id, config, implicit=True)
            if existing is None:  # the old one is past its age but still serving a request
                raise StoreUnavailable("the implicit session is being replaced") from None
            return existing, False
        return state, True

    # -- lookup and use -------------------------------------------------------------------------

    async def get(
        self, session_id: str, config: SessionConfig, *, implicit: bool = False
    ) -> SessionState | None:
        """The live session ``session_id`` of ``config.principal``, or None.

        None covers unknown, deleted, expired and another principal's sessions alike, so a caller
        cannot tell them apart.

        A session this process holds, that the store confirmed within ``recheck`` seconds, is
        not read again while this process follows the store's notices: a DELETE, an eviction or
        a revocation on any process arrives as a notice within milliseconds, and a handshake
        change as a notice to read it again. Expiry is judged here from this process's own view
        (anything past it reads the store). What could go unseen, for ``recheck`` seconds at
        most: a notice lost without the subscription failing, a record whose TTL ran out within
        ``recheck`` of this process's last read, a creation another process refused.
        """
        state = self._live.get(session_id)
        if state is not None and self._confirmed(state, config, implicit):
            return state
        notices = self._notices
        record = await self.store.read(session_id)
        if record is None:
            if state is not None:  # (a live object made during the read is a new session's)
                self._drop(state, SessionEventKind.EXPIRED)
            return None
        if record.principal != config.principal or record.implicit != implicit:
            return None
        if self._removing and self._removing.get(session_id) == record.created_at:
            return None  # a refused creation, being removed
        state = self._live_state(record, config)
        reason = self._expired(state, self.clock(), record.expires_at)
        if reason is not None:
            if not state.in_flight:
                await self.remove(session_id, reason=reason)
            return None
        if state.config != config:  # credential rotated or restored session: use the latest
            state.config = config
        self._confirm(state, notices, self.clock())
        return state

    def _confirm(self, state: SessionState, notices: int, now: float) -> None:
        """The store just gave its word on ``state`` (a read or a write that began when
        ``notices`` notices had come): trust it for ``recheck`` seconds, unless a notice arrived
        meanwhile (it may concern this very session)."""
        if self.recheck and notices == self._notices:
            state.confirmed_at = now

    def _confirmed(self, state: SessionState, config: SessionConfig, implicit: bool) -> bool:
        """Whether ``state`` may be served without reading the store (see :meth:`get`)."""
        if state.closed:
            return False
        now = self.clock()
        if self._sole_user():
            pass  # every change to the store went through this registry: its live object is it
        elif not self.recheck or not self.following:
            return False
        elif not 0 <= now - state.confirmed_at < self.recheck:
            return False  # (a clock that stepped back confirms nothing either)
        if state.principal != config.principal or state.implicit != implicit:
            return False
        if self._expired(state, now) is not None:  # this process's own view: ask the store
            return False
        if state.config != config:
            state.config = config
        return True

    def _sole_user(self) -> bool:
        """This process's store (memory) was only ever used by this registry: a session's live
        object here is exact (no other registry removed or used what it holds)."""
        return self._in_place and self.store.users == 1  # type: ignore[attr-defined]

    async def acquire(self, state: SessionState) -> None:
        """A request starts using ``state``: it cannot expire until :meth:`release`."""
        state.in_flight += 1
        state.last_accessed = self.clock()
        self._busy[id(state)] = state
        if self._live.get(state.session_id) is state:
            self._live.move_to_end(state.session_id)  # most recent
        if (
            self._in_place
            and self._sole_user()
            and state.synced_at + self.session_timeout - state.last_accessed > self.lease
        ):
            # The record written when its last request ended keeps the session for more than a
            # lease from now; in this store records expire only when this registry expires
            # them, and its sweep (twice a lease) renews busy sessions first. The end of this
            # request writes the record anyway. Until then the record's use time lags: the
            # eviction order is kept without a write, and the admin view and the state file
            # take the live object's time (last_use).
            self.store.mark_used(state.session_id)  # type: ignore[attr-defined]
            return
        try:
            await self._sync(state)
        except BaseException:  # the store failed: this request never started using it
            self._leave(state)
            raise

    async def release(self, state: SessionState) -> None:
        """A request ends; idle time starts now if it was the session's last one.

        What this writes is shielded from cancellation, so a request cut short still ends its
        use of the session in the store. A store whose writes never suspend needs no shield (a
        cancellation reaches a task only where it suspends), and a shield costs a cancel scope
        for every request."""
        if not self._leave(state) or state.closed:
            return
        max_age = (  # (the rule of _expired; _leave just set last_accessed to now)
            self.max_session_age is not None
            and state.last_accessed > state.created_at + self.max_session_age
        )
        if self._in_place and not max_age:
            if state.store_mark is not None:  # reserved or leased: the general way
                await self._end_use(state, max_age=False)
            elif (
                self.touch_interval == 0
                or state.last_accessed - state.synced_at >= self.touch_interval
            ):  # _sync's write (a use written within touch_interval is not), in one step
                record, _ = self._record(state, state.last_accessed)  # (no TTL in this store)
                if self.store.write_now(record):  # type: ignore[attr-defined]
                    state.synced_at = record.last_used
                else:
                    self._drop(state, SessionEventKind.EXPIRED)
            return
        with cancel_scope(shield=True):
            await self._end_use(state, max_age=max_age)

    async def _end_use(self, state: SessionState, *, max_age: bool) -> None:
        if max_age:
            await self.remove(state.session_id, reason="max_age")
        elif await self._sync(state, force=self.touch_interval == 0 or state.leased) is False:
            self._drop(state, SessionEventKind.EXPIRED)

    async def save_handshake(self, state: SessionState, handshake: str) -> None:
        """Remember the session's MCP handshake (or a change to it, such as its log level) here
        and in the store, so every process serves the session with it. A session still reserved
        gets it with its commit (in a memory store only this registry uses, with the write that
        ends its creating request: see :meth:`commit`)."""
        state.handshake = sys.intern(handshake)
        if not state.reserved and not state.closed:
            await self._sync(state, force=True)
            await self._notify(f"{CHANGED}:{state.session_id}")  # other processes read it again

    def leave(self, state: SessionState) -> None:
        """A refused creating request ends: drop its in-flight mark; :meth:`discard` follows."""
        self._leave(state)

    def _leave(self, state: SessionState) -> bool:
        """Drop one in-flight mark; True when it was the session's last request."""
        state.in_flight -= 1
        state.last_accessed = self.clock()
        if state.in_flight:
            return False
        self._busy.pop(id(state), None)
        if not self._busy:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return True

    # -- removal and management -----------------------------------------------------------------

    async def remove(self, session_id: str, *, reason: str) -> bool:
        """Remove the session everywhere (store, this process, and other processes' caches)."""
        kind = _KINDS.get(reason, SessionEventKind.EXPIRED)
        announced = False
        remove_and_announce = getattr(self.store, "remove_and_announce", None)
        if kind is not SessionEventKind.EXPIRED and remove_and_announce is not None:
            deleted = bool(await remove_and_announce(session_id, f"{kind}:{session_id}"))
            announced = True  # in the same step (a store shared between processes)
        else:
            deleted = await self.store.remove(session_id)
        self._ended(session_id, kind)
        if deleted:
            self.stats.removed[reason] += 1
            logger.info(
                "Session removed",
                session_id=short_id(session_id),
                total_sessions=len(self),
                reason=reason,
            )
            if kind is not SessionEventKind.EXPIRED and not announced:
                await self._announce(session_id, kind)
        return deleted

    async def sessions_of(
        self, principal: str | None, *, limit: int | None = None
    ) -> list[SessionInfo]:
        """The principal's sessions (least recently used first; None: everyone's), as the admin
        API shows them: short ids only."""
        records = await self.store.principal_sessions(principal, now=self.clock(), limit=limit)
        infos = []
        for r in records:
            last_used = self.last_use(r)
            infos.append(
                SessionInfo(
                    short_id=short_id(r.session_id),
                    principal=r.principal,
                    created_at=r.created_at,
                    last_used=last_used,
                    expires_at=self.deadline(replace(r, last_used=last_used)),
                    implicit=r.implicit,
                )
            )
        return infos

    def last_use(self, record: SessionRecord) -> float:
        """When the session of ``record`` was last used, as this process knows it: its live
        object's time when later (a request running now, whose start the memory store's
        record may not carry, see :meth:`acquire`)."""
        state = self._live.get(record.session_id)
        if state is not None and state.created_at == record.created_at:
            return max(state.last_accessed, record.last_used)
        return record.last_used

    async def revoke(self, session_id: str) -> bool:
        """End one session now, on every worker: its next request gets 404."""
        return await self.remove(session_id, reason="revoked")

    async def revoke_short(self, principal: str, short: str) -> int:
        """Revoke the principal's session shown as ``short`` (its short id); 0 or 1."""
        records = await self.store.principal_sessions(principal, now=self.clock())
        matches = [r for r in records if short_id(r.session_id) == short]
        if len(matches) != 1:  # unknown, or (vanishingly unlikely) ambiguous: revoke nothing
            return 0
        return int(await self.revoke(matches[0].session_id))

    async def revoke_principal(self, principal: str) -> int:
        """End every session of ``principal`` ("log out everywhere"); the number ended."""
        records = await self.store.principal_sessions(principal, now=self.clock())
        revoked = 0
        for record in records:
            revoked += await self.revoke(record.session_id)
        return revoked

    async def sweep(self) -> int:
        """Renew the leases of busy sessions, then expire what is past its deadline."""
        started = time.perf_counter()
        now = self.clock()
        for state in list(self._busy.values()):
            await self._sync(state, force=True, renew=True)  # never expires under a request
        removed = await self._expire_store(now)
        await self._sweep_live(now)
        elapsed = time.perf_counter() - started
        stats = self.stats
        stats.sweeps += 1
        stats.last_sweep_seconds = elapsed
        stats.total_sweep_seconds += elapsed
        stats.max_sweep_seconds = max(stats.max_sweep_seconds, elapsed)
        if removed:
            logger.info(
                "Cleaning up expired sessions",
                count=removed,
                timeout=self.session_timeout,
                total_sessions=len(self),
            )
        else:
            logger.debug("No expired sessions to clean up", total_sessions=len(self))
        return removed

    async def _expire_store(self, now: float) -> int:
        """Let the store drop what is past its deadline; report each as expired.

        A large sweep must not stall the event loop, so it yields every few milliseconds
        (:class:`LoopSlice`: what a report costs depends on the host's logging). Records are
        taken off the end of a reversed copy of the store's list (so in the store's order), each
        freed once reported: freeing a list of 100,000 records at once held the loop for about
        40 ms by itself."""
        records = list(await self.store.expire(now=now))  # (a store may hand out another sequence)
        records.reverse()
        removed = 0
        loop_slice = LoopSlice()
        if records:  # the store's own last slice ran until now
            await loop_slice.next()
        while records:
            record = records.pop()
            removed += 1
            self.stats.removed["expired"] += 1
            self._ended(record.session_id, SessionEventKind.EXPIRED, record)
            logger.info(
                "Session removed",
                session_id=short_id(record.session_id),
                total_sessions=len(self),
                reason="expired",
            )
            if loop_slice.over():
                await loop_slice.next()
        return removed

    async def close_local(self) -> int:
        """Release every live object of this process (shutdown). Store contents are kept."""
        states = list(self._live.values())
        self._live.clear()
        for state in states:
            state.closed = True
            self._emit(SessionEventKind.CLOSED, state.session_id, state.principal, state)
        return len(states)

    @asynccontextmanager
    async def follow_other_processes(self) -> AsyncIterator[None]:
        """While open, drop the live objects of sessions other processes announce as ended.

        A background service (the middleware runs it); a no-op with stores that are not shared.
        """
        listen = getattr(self.store, "ended_sessions", None)
        if listen is None:
            yield
            return

        async def follow() -> None:
            while True:
                try:
                    async for notice in listen():
                        self._notices += 1
                        kind, _, session_id = notice.partition(":")
                        if kind == SUBSCRIBED:  # no gap from here: new confirmations count
                            for state in self._live.values():
                                state.confirmed_at = NEVER
                            self.following = True
                        elif kind == CHANGED:
                            self._unconfirm(session_id)
                        else:
                            self._ended(session_id, _KINDS.get(kind, SessionEventKind.DELETED))
                except StoreUnavailable:
                    self.following = False  # notices may be missed: read every time
                    await asyncio.sleep(1.0)  # the store is away: lookups refuse ended ids
                except Exception:
                    self.following = False
                    text = "Following other processes' session ends failed"
                    logger.error(text, **exception_fields())
                    await asyncio.sleep(1.0)
                finally:
                    self.following = False

        task = asyncio.get_running_loop().create_task(follow(), name="mcp2anp-session-follow")
        try:
            yield
        finally:
            await cancel_and_wait(task)  # (a swallowed cancellation must not hold the stop)

    def _unconfirm(self, session_id: str) -> None:
        state = self._live.get(session_id)
        if state is not None:
            state.confirmed_at = NEVER

    # -- internals ------------------------------------------------------------------------------

    async def _sync(
        self, state: SessionState, *, force: bool = False, renew: bool = False
    ) -> bool | None:
        """Write the session's use to the store unless written within ``touch_interval``."""
        if state.reserved:  # only a commit turns a reservation into a full lifetime
            return None
        if not force and state.last_accessed - state.synced_at < self.touch_interval:
            return None
        if self._in_place:  # the write cannot be overtaken: it never suspends
            now = self.clock()
            record, ttl = self._record(state, now, renew=renew)
            state.leased = self._leased(state, renew)
            written = await self.store.write(record, ttl=ttl, now=now)
            state.synced_at = record.last_used
            return written
        # One write per session at a time, each computed when its turn comes: a sweep renewing a
        # lease and the end of the last request must reach the store in the order they decided,
        # or a lease could outlive the request it was for.
        while (pending := self._writes.get(id(state))) is not None:
            await asyncio.shield(pending)
        done = asyncio.get_running_loop().create_future()
        self._writes[id(state)] = done
        try:
            now = self.clock()
            record, ttl = self._record(state, now, renew=renew)
            state.leased = self._leased(state, renew)
            notices = self._notices
            written = await self.store.write(record, ttl=ttl, now=now)
            state.synced_at = record.last_used
            if written:
                self._confirm(state, notices, now)
            return written
        finally:
            del self._writes[id(state)]
            done.set_result(None)

    def _live_state(self, record: SessionRecord, config: SessionConfig) -> SessionState:
        state = self._live.get(record.session_id)
        if state is not None and state.created_at != record.created_at:
            self._ended(record.session_id, SessionEventKind.EXPIRED)  # a stale earlier session
            state = None
        if state is None:
            state = SessionState(
                record.session_id,
                config,
                created_at=record.created_at,
                last_accessed=record.last_used,
                implicit=record.implicit,
            )
            self._cache(state)
        elif record.last_used > state.last_accessed:  # used by another process since
            state.last_accessed = state.synced_at = record.last_used
        if record.handshake is not None and record.handshake != state.handshake:
            state.handshake = sys.intern(record.handshake)  # set, or changed by another process
        return state

    def _cache(self, state: SessionState) -> None:
        live = self._live
        max_age = self.max_session_age
        new = max_age is not None and live.get(state.session_id) is not state
        live[state.session_id] = state
        if new and max_age is not None:
            aged = self._by_age
            if len(aged) >= 2 * len(live) + 64:  # mostly entries of objects dropped since
                aged[:] = [(s.created_at + max_age, i) for i, s in live.items()]
                heapq.heapify(aged)
            else:
                heapq.heappush(aged, (state.created_at + max_age, state.session_id))
        while len(self._live) > self.live_cache:
            oldest = next(iter(self._live.values()))
            if oldest.in_flight:  # cannot drop an object a request holds; try again later
                self._live.move_to_end(oldest.session_id)
                break
            del self._live[oldest.session_id]
            oldest.closed = True
            self._emit(SessionEventKind.CLOSED, oldest.session_id, oldest.principal, oldest)

    async def _sweep_live(self, now: float) -> None:
        """Drop this process's live objects of sessions past their deadline, oldest use first.

        Each candidate's record decides (one read per candidate, so O(expired)): gone or past
        what the store keeps it for means expired; a record another worker keeps alive with a
        lease only means this process's copy is no longer needed.

        Sessions past their maximum age come from their own heap: used lately, they stand
        behind sessions that are not over in the order of use (a store with expiry of its own,
        Redis, reports none of them)."""
        over: dict[int, tuple[SessionState, float]] = {}  # (each with its last use now)
        for state in self._live.values():  # no copy: a sweep that finds nothing costs O(1)
            if state.last_accessed + self.session_timeout >= now and (
                self.max_session_age is None or now <= state.created_at + self.max_session_age
            ):
                break  # ordered by use: the rest were used more recently
            if not state.in_flight and self._expired(state, now) is not None:
                over[id(state)] = (state, state.last_accessed)
        aged = self._by_age
        due: list[tuple[float, str]] = []
        while aged and aged[0][0] < now:
            entry = heapq.heappop(aged)
            aging = self._live.get(entry[1])
            if aging is None or aging.created_at + (self.max_session_age or 0.0) != entry[0]:
                continue  # an object dropped since
            due.append(entry)  # (back in the heap unless ended below: busy, or a store failure)
            if not aging.in_flight:
                over[id(aging)] = (aging, aging.last_accessed)
        try:
            for state, last_use in over.values():
                if self._live.get(state.session_id) is not state:
                    continue  # ended since (this loop awaits), or another session's id now
                record = await self.store.read(state.session_id)
                alive = record is not None and record.created_at == state.created_at
                why = self._expired(state, now, record.expires_at) if record else None
                if (
                    self._live.get(state.session_id) is not state
                    or state.in_flight
                    or state.last_accessed != last_use
                ):
                    continue  # (used since it was listed, or now: its last request wrote that)
                if alive and why is not None:
                    await self.remove(state.session_id, reason=why)
                elif alive:
                    self._ended(state.session_id, SessionEventKind.CLOSED)
                else:
                    self._ended(state.session_id, SessionEventKind.EXPIRED)
        finally:
            max_age = self.max_session_age or 0.0
            for entry in due:  # those still live: busy ones, or a sweep cut short
                aging = self._live.get(entry[1])
                if aging is not None and aging.created_at + max_age == entry[0]:
                    heapq.heappush(aged, entry)

    def _drop(self, state: SessionState, kind: SessionEventKind) -> None:
        """End ``state`` if it is still this process's object of its session: a read or a write
        that found the record gone says nothing of an object made for the same id since (an
        implicit session's id is its principal's, made again at once by its next request)."""
        if self._live.get(state.session_id) is state:
            self._ended(state.session_id, kind)

    def _ended(
        self,
        session_id: str,
        kind: SessionEventKind,
        record: SessionRecord | None = None,
    ) -> None:
        """The session is over: drop its live object here and tell the subscribers.

        Ending a ``record`` (one the store expired) leaves alone a live object of a later
        session with the same id: an implicit session's id is its principal's, and one can be
        made again while a sweep yields with the earlier record still to report. Nothing is
        told then: the earlier session's own live object was ended when it was found gone."""
        state = self._live.get(session_id)
        if state is not None and record is not None and state.created_at != record.created_at:
            return
        state = self._live.pop(session_id, None)
        if state is not None:
            state.closed = True
            self._emit(kind, session_id, state.principal, state)
        elif record is not None:
            self._emit(kind, session_id, record.principal, None, implicit=record.implicit)

    def _emit(
        self,
        kind: SessionEventKind,
        session_id: str,
        principal: str,
        state: SessionState | None,
        *,
        implicit: bool = False,
    ) -> None:
        if not self.events:  # nobody listens: build nothing
            return
        if state is not None:
            implicit = state.implicit
        self.events.emit(SessionEvent(kind, session_id, principal, implicit, state))

    async def _announce(self, session_id: str, kind: SessionEventKind) -> None:
        """Tell other processes (shared stores only) as ``kind:id``, so they emit the same kind."""
        await self._notify(f"{kind}:{session_id}")

    async def _notify(self, notice: str) -> None:
        announce = getattr(self.store, "announce_ended", None)
        if announce is not None:
            with suppress(StoreUnavailable):
                await announce(notice)


def _check_store(store: SessionStore) -> None:
    """Refuse, when the registry is made, a store written against the interface before
    reservations (no ``commit``, no ``pending``): it would fail every new session."""
    create = getattr(store, "create", None)
    try:
        parameters = inspect.signature(create).parameters if create is not None else {}
    except (TypeError, ValueError):  # not introspectable: trust it
        return
    takes_pending = "pending" in parameters or any(
        parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters.values()
    )
    if not callable(getattr(store, "commit", None)) or not takes_pending:
        raise TypeError(
            f"{type(store).__name__} lacks SessionStore.commit() or create(..., pending=): "
            "stores must implement both (see docs/api.md, Stores)"
        )


SUBSCRIBED = "subscribed"
"""A store's notice stream says it is subscribed (``subscribed:``): no notice is missed from
then on, until the stream fails."""
CHANGED = "changed"
"""``changed:id``: the session's record changed (its handshake): read it again at the next use."""

_KINDS = {
    "expired": SessionEventKind.EXPIRED,
    "max_age": SessionEventKind.EXPIRED,
    "evicted": SessionEventKind.EVICTED,
    "deleted": SessionEventKind.DELETED,
    "revoked": SessionEventKind.REVOKED,
}
