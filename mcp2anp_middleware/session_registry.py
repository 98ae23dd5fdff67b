"""In-process registry of live sessions with an expiry sweep that costs O(expired).

The seed scans every session on every sweep. Here idle sessions sit in an ``OrderedDict`` kept in
order of ``last_accessed``: a touch moves a session to the back, so the sweep pops expired sessions
from the front and stops at the first live one. Sessions with a request in flight are taken out of
that queue while they are busy, so they can never be swept from under a request, and go back in at
the end of their last request (which is when their idle time starts). An optional absolute lifetime
uses a second queue in creation order. Large sweeps yield to the event loop every
``sweep_batch`` removals.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

import structlog

from .clock import Clock, system_clock
from .session_ids import new_session_id, short_id
from .session_state import SessionConfig, SessionState

logger = structlog.get_logger("mcp2anp_middleware.sessions")

RemovalHook = Callable[[SessionState, str], None]


class SessionRegistry:
    """Owns every :class:`SessionState` of this process."""

    def __init__(
        self,
        *,
        session_timeout: float = 1800.0,
        max_session_age: float | None = None,
        clock: Clock = system_clock,
        sweep_batch: int = 1000,
        on_removed: RemovalHook | None = None,
    ) -> None:
        if session_timeout <= 0:
            raise ValueError("session_timeout must be positive")
        if max_session_age is not None and max_session_age <= 0:
            raise ValueError("max_session_age must be positive")
        self.session_timeout = session_timeout
        self.max_session_age = max_session_age
        self.clock = clock
        self.sweep_batch = max(1, sweep_batch)
        self._on_removed = on_removed
        self._sessions: dict[str, SessionState] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._by_age: OrderedDict[str, None] = OrderedDict()
        self._implicit: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def __contains__(self, session_id: object) -> bool:
        return session_id in self._sessions

    # -- creation -------------------------------------------------------------------------------

    def new_session(self, config: SessionConfig, *, implicit: bool = False) -> SessionState:
        """Build a session that is not yet registered (it becomes visible on :meth:`register`)."""
        session_id = new_session_id()
        while session_id in self._sessions:  # pragma: no cover - 256-bit collision
            session_id = new_session_id()
        return SessionState(session_id, config, clock=self.clock, implicit=implicit)

    def register(self, state: SessionState) -> None:
        if state.session_id in self._sessions:
            raise KeyError("session id already registered")
        self._sessions[state.session_id] = state
        if state.in_flight == 0:
            self._idle[state.session_id] = None
        if self.max_session_age is not None:
            self._by_age[state.session_id] = None
        if state.implicit:
            self._implicit[state.principal] = state.session_id
        logger.info(
            "Session created",
            session_id=short_id(state.session_id),
            total_sessions=len(self._sessions),
            implicit=state.implicit,
        )

    def implicit_session(self, config: SessionConfig) -> SessionState:
        """The one session-less-era session of ``config.principal``, created on first use."""
        session_id = self._implicit.get(config.principal)
        if session_id is not None:
            state = self.get(session_id)
            if state is not None:
                return state
        state = self.new_session(config, implicit=True)
        self.register(state)
        return state

    # -- lookup and use -------------------------------------------------------------------------

    def get(self, session_id: str) -> SessionState | None:
        """The live session with this id, or None if unknown, closed or already past its time.

        Expiry is checked here too, so a session is never served after its timeout just because
        the sweep has not run yet.
        """
        state = self._sessions.get(session_id)
        if state is None:
            return None
        reason = self._due_reason(state, self.clock())
        if reason is not None:
            self.remove(session_id, reason=reason)
            return None
        return state

    def acquire(self, state: SessionState) -> None:
        """Mark a request as using ``state``; it cannot expire until :meth:`release`."""
        if state.in_flight == 0:
            self._idle.pop(state.session_id, None)
        state.in_flight += 1
        state.touch()

    def release(self, state: SessionState) -> None:
        """End a request's use of ``state``; idle time starts now if it was the last one."""
        state.in_flight -= 1
        state.touch()
        if state.in_flight == 0 and not state.closed and state.session_id in self._sessions:
            if self._past_max_age(state, self.clock()):
                self.remove(state.session_id, reason="max_age")
            else:
                self._idle[state.session_id] = None

    # -- removal --------------------------------------------------------------------------------

    def remove(self, session_id: str, *, reason: str) -> bool:
        state = self._sessions.pop(session_id, None)
        if state is None:
            return False
        self._idle.pop(session_id, None)
        self._by_age.pop(session_id, None)
        if state.implicit and self._implicit.get(state.principal) == session_id:
            del self._implicit[state.principal]
        state.closed = True
        if self._on_removed is not None:
            self._on_removed(state, reason)
        state.anp_crawler = None
        state.anp_handler = None
        logger.info(
            "Session removed",
            session_id=short_id(session_id),
            total_sessions=len(self._sessions),
            reason=reason,
        )
        return True

    async def sweep(self) -> int:
        """Remove every session past its idle timeout or absolute lifetime; return how many."""
        removed = 0
        now = self.clock()
        cutoff = now - self.session_timeout
        while self._idle:
            session_id = next(iter(self._idle))
            if self._sessions[session_id].last_accessed >= cutoff:
                break
            self.remove(session_id, reason="expired")
            removed += 1
            if removed % self.sweep_batch == 0:
                await asyncio.sleep(0)
        removed += await self._sweep_max_age(now)
        if removed:
            logger.info(
                "Cleaning up expired sessions",
                count=removed,
                timeout=self.session_timeout,
                total_sessions=len(self._sessions),
            )
        else:
            logger.debug("No expired sessions to clean up", total_sessions=len(self._sessions))
        return removed

    async def close_all(self) -> int:
        """Forget every session (used at shutdown when state is not persisted)."""
        count = 0
        for session_id in list(self._sessions):
            self.remove(session_id, reason="shutdown")
            count += 1
            if count % self.sweep_batch == 0:
                await asyncio.sleep(0)
        return count

    # -- internals ------------------------------------------------------------------------------

    def _due_reason(self, state: SessionState, now: float) -> str | None:
        if state.in_flight:
            return None
        if now - state.last_accessed > self.session_timeout:
            return "expired"
        if self._past_max_age(state, now):
            return "max_age"
        return None

    def _past_max_age(self, state: SessionState, now: float) -> bool:
        return self.max_session_age is not None and now - state.created_at > self.max_session_age

    async def _sweep_max_age(self, now: float) -> int:
        if self.max_session_age is None:
            return 0
        removed = 0
        cutoff = now - self.max_session_age
        while self._by_age:
            session_id = next(iter(self._by_age))
            state = self._sessions[session_id]
            if state.created_at >= cutoff:
                break
            self._by_age.pop(session_id)
            if state.in_flight:
                continue  # removed by release() when its last request ends
            self.remove(session_id, reason="max_age")
            removed += 1
            if removed % self.sweep_batch == 0:
                await asyncio.sleep(0)
        return removed
