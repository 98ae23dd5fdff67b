"""This process's view of the sessions: live objects over a (possibly shared) metadata store.

With the in-memory store the live :class:`SessionState` objects are the store's records. With a
shared store (Redis) they are a per-process cache in front of it: a session arriving here for the
first time is rebuilt from its metadata, one deleted or expired elsewhere is gone here at its next
request, and the sweep only evicts idle entries from the cache (the store expires by TTL).

A session with a request in flight is never expired under it; idle time counts from the end of its
last request. Expiry is also checked on every lookup, so a session is refused at its timeout even
if the sweep has not run yet.
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import anyio
import structlog

from .clock import Clock, system_clock
from .session_ids import new_session_id, short_id
from .session_state import SessionConfig, SessionState
from .stores.base import Caps, SessionStore, StoredSession, StoreUnavailable
from .stores.memory import InMemorySessionStore

logger = structlog.get_logger("mcp2anp_middleware.sessions")

RemovalHook = Callable[[SessionState, str], None]


class ShuttingDown(Exception):
    """New sessions are refused while the server drains (answered 503)."""


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


_RETRY_FIRST = 0.1
_RETRY_MAX = 2.0
_RETRY_SETTLE = 1.0
MAX_DURATION = 10 * 365 * 86400.0
"""Longest timeout or age accepted (ten years): stores turn them into integer TTLs."""


def _check_duration(name: str, value: float, *, allow_zero: bool = False) -> None:
    """Refuse NaN, infinities and out-of-range durations at construction, not at first use."""
    if not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        expected = "a finite number of seconds" + ("" if allow_zero else " above 0")
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    if value > MAX_DURATION:
        raise ValueError(f"{name} must be at most {MAX_DURATION:g} seconds, got {value!r}")


def implicit_session_id(principal: str) -> str:
    """The id of a principal's session-less-era session; internal, never sent on the wire."""
    return "implicit-" + hashlib.sha256(principal.encode()).hexdigest()[:40]


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
        sweep_batch: int = 1000,
        on_removed: RemovalHook | None = None,
    ) -> None:
        _check_duration("session_timeout", session_timeout)
        if max_session_age is not None:
            _check_duration("max_session_age", max_session_age)
        if touch_interval is not None:
            _check_duration("touch_interval", touch_interval, allow_zero=True)
        self.store: SessionStore = (
            store if store is not None else InMemorySessionStore(batch=sweep_batch)
        )
        self.session_timeout = session_timeout
        self.max_session_age = max_session_age
        self.clock = clock
        self.touch_interval = (
            self.store.default_touch_interval if touch_interval is None else touch_interval
        )
        self.caps = Caps(per_principal_cap, global_cap, evict_oldest)
        self.sweep_batch = max(1, sweep_batch)
        self._on_removed = on_removed
        self._shared = not self.store.holds_live_objects
        self._live: OrderedDict[str, SessionState] = OrderedDict()  # shared stores only
        self._busy: dict[str, SessionState] = {}
        self.stats = RegistryStats()
        self.accepting = True
        self._idle_waiters: list[asyncio.Future[None]] = []
        self._compensations: set[asyncio.Task[None]] = set()

    # -- local view -----------------------------------------------------------------------------

    def __len__(self) -> int:
        """Sessions known to this process (all of them with the in-memory store)."""
        if self._shared:
            return len(self._live)
        return len(self._memory)

    def __contains__(self, session_id: object) -> bool:
        if self._shared:
            return session_id in self._live
        return isinstance(session_id, str) and self._memory.peek(session_id) is not None

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
        return SessionState(new_session_id(), config, clock=self.clock)

    async def register(self, state: SessionState, *, reservation: float | None = None) -> None:
        """Reserve ``state`` in the store (caps apply); :meth:`commit` or :meth:`discard` it.

        With ``reservation`` the store keeps the record only that long unless :meth:`commit`
        extends it, so a creation the store carries out after its request was refused (a stalled
        Redis running the script late) lapses by itself instead of counting against the caps for
        a whole idle timeout.
        """
        if not self.accepting:
            raise ShuttingDown("server is shutting down; no new sessions")
        ttl = self._ttl() if reservation is None else min(reservation, self._ttl())
        try:
            outcome = await self.store.create(state, ttl=ttl, now=self.clock(), caps=self.caps)
        except StoreUnavailable:
            await self.discard(state)  # the store may still carry the creation out later
            raise
        if not outcome.created:
            raise KeyError("session id already exists")
        state.synced_at = state.last_accessed
        state.reserved = reservation is not None
        for evicted in outcome.evicted_sessions:
            if isinstance(evicted, SessionState):
                self._close(evicted, "evicted")
        for victim_id in outcome.evicted:
            self._release_local(victim_id, "evicted")
            self.stats.removed["evicted"] += 1
            logger.info("Session removed", session_id=short_id(victim_id), reason="evicted")
        if self._shared:
            self._live[state.session_id] = state

    async def commit(self, state: SessionState) -> None:
        """The session's creating request succeeded: it now counts, and its id may be shown.

        A reservation is first extended to the full lifetime; if the store cannot confirm that
        (unreachable, or the reservation lapsed) this raises :class:`StoreUnavailable` and the
        caller refuses the request instead of handing out an id the store may not keep.
        """
        if state.reserved:
            if not await self.store.touch(state, ttl=self._ttl(), now=state.last_accessed):
                raise StoreUnavailable("session reservation lapsed before its commit")
            state.reserved = False
            state.synced_at = state.last_accessed
        self.stats.created += 1
        logger.info(
            "Session created",
            session_id=short_id(state.session_id),
            total_sessions=len(self),
            implicit=state.implicit,
        )

    def abandon(self, state: SessionState) -> None:
        """A creating request failed: forget its reservation here; :meth:`discard` removes it
        from the store. Synchronous so it holds even when the request is being cancelled."""
        self._live.pop(state.session_id, None)
        state.closed = True

    async def discard(self, state: SessionState) -> None:
        """Remove a refused creation from the store, leaving no trace of the request.

        The delete is fenced to this very record (``created_at``), so it never removes a later
        session with the same id. If the store is unreachable the delete is retried in the
        background until it lands: a stalled store may still carry out the creation after the
        client had its answer, and that record must not outlive the stall.
        """
        if state.in_flight:  # an implicit session another request of its principal now uses
            return
        self.abandon(state)
        try:
            with anyio.CancelScope(shield=True):
                await self.store.delete(state.session_id, created_at=state.created_at)
        except StoreUnavailable:
            self._retry_in_background(state.session_id, state.created_at)

    async def settle(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds for background compensations, then cancel the rest (the
        reservation or the TTL removes what they could not); True when all finished."""
        pending = set(self._compensations)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=grace)
            for task in pending:
                task.cancel()
        return not pending

    def _retry_in_background(self, session_id: str, created_at: float) -> None:
        task = asyncio.get_running_loop().create_task(self._retry_delete(session_id, created_at))
        self._compensations.add(task)
        task.add_done_callback(self._compensations.discard)

    async def _retry_delete(self, session_id: str, created_at: float) -> None:
        """Delete until the store answers, then once more after a pause: a creation still queued
        behind the stall runs before a later request of ours, but not always before the first."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + self._ttl()
        delay, confirmations = _RETRY_FIRST, 0
        while confirmations < 2 and loop.time() < give_up:
            await asyncio.sleep(delay)
            try:
                deleted = await self.store.delete(session_id, created_at=created_at)
            except StoreUnavailable:
                delay = min(delay * 2, _RETRY_MAX)
                continue
            if deleted:
                logger.info(
                    "Refused session removed after the store recovered",
                    session_id=short_id(session_id),
                )
                return
            confirmations += 1
            delay = _RETRY_SETTLE

    async def implicit_session(self, config: SessionConfig) -> tuple[SessionState, bool]:
        """The principal's one session-less-era session, and whether this call created it.

        A created session is the caller's to :meth:`commit` (its request was served) or
        :meth:`discard` (its request was refused).
        """
        session_id = implicit_session_id(config.principal)
        state = await self.get(session_id, config, implicit=True)
        if state is not None:
            return state, False
        state = SessionState(session_id, config, clock=self.clock, implicit=True)
        try:
            await self.register(state)
        except KeyError:  # another request or process created it first
            existing = await self.get(session_id, config, implicit=True)
            if existing is None:
                raise
            return existing, False
        return state, True

    # -- lookup and use -------------------------------------------------------------------------

    async def get(
        self, session_id: str, config: SessionConfig, *, implicit: bool = False
    ) -> SessionState | None:
        """The live session ``session_id`` of ``config.principal``, or None.

        None covers unknown, deleted, expired and another principal's sessions alike, so a caller
        cannot tell them apart.
        """
        stored = await self.store.load(session_id)
        if stored is None:
            self._release_local(session_id, "gone")
            return None
        if stored.principal != config.principal or stored.implicit != implicit:
            return None
        state = self._live_state(stored, config)
        now = self.clock()
        if self._past_max_age(state, now):  # however busy: its last request removes it
            if not state.in_flight:
                await self.remove(session_id, reason="max_age")
            return None
        reason = self._due_reason(state, now)
        if reason is not None:
            await self.remove(session_id, reason=reason)
            return None
        if state.config != config:  # credential rotated or restored session: use the latest
            state.config = config
            state.anp_crawler = state.anp_handler = None
        return state

    async def acquire(self, state: SessionState) -> None:
        """A request starts using ``state``: it cannot expire until :meth:`release`."""
        state.in_flight += 1
        state.touch()
        self._busy[state.session_id] = state
        if self._shared:
            if state.session_id in self._live:
                self._live.move_to_end(state.session_id)
            try:
                await self._sync(state)
            except BaseException:  # the store failed: this request never started using it
                self._leave(state)
                raise
        else:  # move it behind the idle ones so it cannot hide them from the sweep
            await self.store.touch(state, ttl=self._ttl(), now=state.last_accessed)

    async def release(self, state: SessionState) -> None:
        """A request ends; idle time starts now if it was the session's last one."""
        if not self._leave(state) or state.closed:
            return
        if self._past_max_age(state, self.clock()):
            await self.remove(state.session_id, reason="max_age")
        elif await self._sync(state, force=not self._shared) is False:
            self._release_local(state.session_id, "gone")

    def leave(self, state: SessionState) -> None:
        """A refused creating request ends: drop its in-flight mark; :meth:`discard` follows."""
        self._leave(state)

    def _leave(self, state: SessionState) -> bool:
        """Drop one in-flight mark; True when it was the session's last request."""
        state.in_flight -= 1
        state.touch()
        if state.in_flight:
            return False
        self._busy.pop(state.session_id, None)
        if not self._busy:
            for waiter in self._idle_waiters:
                if not waiter.done():
                    waiter.set_result(None)
        return True

    # -- removal --------------------------------------------------------------------------------

    async def remove(self, session_id: str, *, reason: str) -> bool:
        local = self._local(session_id)
        deleted = await self.store.delete(session_id)
        if local is not None:
            self._close(local, reason)
        if deleted:
            self.stats.removed[reason] += 1
            logger.info(
                "Session removed",
                session_id=short_id(session_id),
                total_sessions=len(self),
                reason=reason,
            )
        return deleted

    async def sweep(self) -> int:
        """Expire idle sessions (store) and evict idle cache entries (shared stores)."""
        started = time.perf_counter()
        now = self.clock()
        removed = 0
        for stored, reason in await self.store.expire(
            now=now,
            idle_timeout=self.session_timeout,
            max_age=self.max_session_age,
            is_busy=self._busy.__contains__,
        ):
            removed += 1
            self.stats.removed[reason] += 1
            if isinstance(stored, SessionState):
                self._close(stored, reason)
            logger.info(
                "Session removed",
                session_id=short_id(stored.session_id),
                total_sessions=len(self),
                reason=reason,
            )
            if removed % self.sweep_batch == 0:
                await asyncio.sleep(0)  # a large sweep must not stall the event loop
        if self._shared:
            await self._sweep_local(now)
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

    async def close_local(self) -> int:
        """Release every live object of this process (shutdown). Store contents are kept."""
        states = list(self._live.values()) if self._shared else list(self._memory_states())
        for state in states:
            state.anp_crawler = state.anp_handler = None
        self._live.clear()
        return len(states)

    # -- internals ------------------------------------------------------------------------------

    def _ttl(self) -> float:
        """Store TTL: idle timeout plus touch throttle, so throttling never expires one early."""
        ttl = self.session_timeout + self.touch_interval
        if self.max_session_age is not None:
            ttl = min(ttl, self.max_session_age + self.touch_interval)
        return ttl

    async def _sync(self, state: SessionState, *, force: bool = False) -> bool | None:
        """Write the session's use to the store unless written within ``touch_interval``."""
        if state.reserved:  # only a commit turns a reservation into a full lifetime
            return None
        if not force and state.last_accessed - state.synced_at < self.touch_interval:
            return None
        alive = await self.store.touch(state, ttl=self._ttl(), now=state.last_accessed)
        state.synced_at = state.last_accessed
        return alive

    def _live_state(self, stored: StoredSession, config: SessionConfig) -> SessionState:
        if isinstance(stored, SessionState):
            return stored
        state = self._live.get(stored.session_id)
        if state is not None and state.created_at != stored.created_at:
            self._close(state, "replaced")  # a stale copy of an earlier session with this id
            state = None
        if state is None:
            state = SessionState(
                stored.session_id, config, clock=self.clock, implicit=stored.implicit
            )
            state.created_at = stored.created_at
            state.last_accessed = state.synced_at = stored.last_accessed
            self._live[stored.session_id] = state
        else:
            state.last_accessed = max(state.last_accessed, stored.last_accessed)
            state.synced_at = max(state.synced_at, stored.last_accessed)
        return state

    @property
    def _memory(self) -> InMemorySessionStore:
        assert isinstance(self.store, InMemorySessionStore)
        return self.store

    def _memory_states(self) -> list[SessionState]:
        return [s for s in self._memory.sessions() if isinstance(s, SessionState)]

    def _local(self, session_id: str) -> SessionState | None:
        if self._shared:
            return self._live.get(session_id)
        found = self._memory.peek(session_id)
        return found if isinstance(found, SessionState) else None

    def _release_local(self, session_id: str, reason: str) -> None:
        state = self._live.pop(session_id, None) if self._shared else None
        if state is not None:
            self._close(state, reason)

    def _close(self, state: SessionState, reason: str) -> None:
        self._live.pop(state.session_id, None)
        state.closed = True
        if self._on_removed is not None:
            self._on_removed(state, reason)
        state.anp_crawler = None
        state.anp_handler = None

    def _due_reason(self, state: SessionState, now: float) -> str | None:
        if state.in_flight:
            return None
        # With a shared store another process may have used the session without writing it yet
        # (throttled touches), so only idle time beyond that tolerance proves expiry.
        tolerance = self.touch_interval if self._shared else 0.0
        if now - state.last_accessed > self.session_timeout + tolerance:
            return "expired"
        return None

    def _past_max_age(self, state: SessionState, now: float) -> bool:
        return self.max_session_age is not None and now - state.created_at > self.max_session_age

    async def _sweep_local(self, now: float) -> None:
        """Evict cache entries idle past the timeout (oldest use first) and refresh busy TTLs."""
        cutoff = now - self.session_timeout
        requeued: set[str] = set()
        while self._live:
            session_id, state = next(iter(self._live.items()))
            if session_id in requeued or state.last_accessed >= cutoff:
                break
            if state.in_flight:
                self._live.move_to_end(session_id)
                requeued.add(session_id)
                continue
            self._live.pop(session_id)  # still in the store; rebuilt here if used again
            state.anp_crawler = state.anp_handler = None
        for state in list(self._busy.values()):
            state.touch()
            await self._sync(state)
