"""The embedded default store: this process's memory, expiry in O(expired).

Sessions sit in an ``OrderedDict`` in order of last use (a touch moves one to the back), so expiry
pops from the front and stops at the first live session: its cost grows with the number of expired
sessions, not live ones. The seed design scanned every session instead. A second queue in creation
order serves the absolute lifetime, and a per-principal queue in order of use serves caps.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Callable

from .base import CapExceeded, Caps, CreateOutcome, StoredSession


class InMemorySessionStore:
    """Sessions of this process only; large expiries yield to the event loop every ``batch``."""

    holds_live_objects = True
    default_touch_interval = 0.0

    def __init__(self, *, batch: int = 1000) -> None:
        self.batch = max(1, batch)
        self._sessions: dict[str, StoredSession] = {}
        self._idle: OrderedDict[str, None] = OrderedDict()
        self._by_age: OrderedDict[str, None] = OrderedDict()
        self._by_principal: dict[str, OrderedDict[str, None]] = {}

    def __len__(self) -> int:
        return len(self._sessions)

    def peek(self, session_id: str) -> StoredSession | None:
        return self._sessions.get(session_id)

    def sessions(self) -> list[StoredSession]:
        return list(self._sessions.values())

    async def create(
        self, session: StoredSession, *, ttl: float, now: float, caps: Caps
    ) -> CreateOutcome:
        session_id = session.session_id
        if session_id in self._sessions:
            return CreateOutcome(created=False)
        evicted: tuple[StoredSession, ...] = ()
        owned = self._by_principal.get(session.principal)
        at_cap = caps.per_principal is not None and owned and len(owned) >= caps.per_principal
        if at_cap and not caps.evict_oldest:
            raise CapExceeded("principal", caps.per_principal or 0)
        # An eviction frees a place, so count it before refusing at the global cap (and never
        # evict for a request that is refused anyway).
        total_after = len(self._sessions) - (1 if at_cap else 0)
        if caps.global_limit is not None and total_after >= caps.global_limit:
            raise CapExceeded("global", caps.global_limit)
        if at_cap and owned:
            victim = self._sessions[next(iter(owned))]  # least recently used
            self._forget(victim.session_id)
            evicted = (victim,)
        self._sessions[session_id] = session
        self._idle[session_id] = None
        self._by_age[session_id] = None
        self._by_principal.setdefault(session.principal, OrderedDict())[session_id] = None
        return CreateOutcome(
            created=True,
            evicted=tuple(s.session_id for s in evicted),
            evicted_sessions=evicted,
        )

    def reindex(self) -> None:
        """Re-sort the use-ordered queues by ``last_accessed`` (after a bulk restore, whose
        sessions arrive in creation order)."""
        by_use = sorted(self._sessions.values(), key=lambda s: s.last_accessed)
        self._idle = OrderedDict((s.session_id, None) for s in by_use)
        self._by_principal = {}
        for session in by_use:
            self._by_principal.setdefault(session.principal, OrderedDict())[session.session_id] = (
                None
            )

    async def load(self, session_id: str) -> StoredSession | None:
        return self._sessions.get(session_id)

    async def touch(self, session: StoredSession, *, ttl: float, now: float) -> bool:
        session_id = session.session_id
        if session_id not in self._sessions:
            return False
        self._idle[session_id] = None
        self._idle.move_to_end(session_id)
        owned = self._by_principal.get(session.principal)
        if owned is not None and session_id in owned:
            owned.move_to_end(session_id)
        return True

    async def delete(self, session_id: str, *, created_at: float | None = None) -> bool:
        session = self._sessions.get(session_id)
        if session is None or (created_at is not None and session.created_at != created_at):
            return False
        return self._forget(session_id)

    async def expire(
        self,
        *,
        now: float,
        idle_timeout: float,
        max_age: float | None,
        is_busy: Callable[[str], bool],
    ) -> list[tuple[StoredSession, str]]:
        removed: list[tuple[StoredSession, str]] = []
        cutoff = now - idle_timeout
        requeued: set[str] = set()
        while self._idle:
            session_id = next(iter(self._idle))
            if session_id in requeued or self._sessions[session_id].last_accessed >= cutoff:
                break
            if is_busy(session_id):  # in use: goes to the back, its request will touch it
                self._idle.move_to_end(session_id)
                requeued.add(session_id)
                continue
            removed.append((self._sessions[session_id], "expired"))
            self._forget(session_id)
            if len(removed) % self.batch == 0:
                await asyncio.sleep(0)
        if max_age is not None:
            age_cutoff = now - max_age
            while self._by_age:
                session_id = next(iter(self._by_age))
                if self._sessions[session_id].created_at >= age_cutoff:
                    break
                self._by_age.pop(session_id)
                if not is_busy(session_id):  # a busy one is removed when its request ends
                    removed.append((self._sessions[session_id], "max_age"))
                    self._forget(session_id)
                    if len(removed) % self.batch == 0:
                        await asyncio.sleep(0)
        return removed

    async def count(self, *, now: float) -> int:
        return len(self._sessions)

    async def count_for(self, principal: str, *, now: float) -> int:
        return len(self._by_principal.get(principal, ()))

    async def ping(self) -> bool:
        return True

    async def aclose(self) -> None:
        return None

    def _forget(self, session_id: str) -> bool:
        session = self._sessions.pop(session_id, None)
        if session is None:
            return False
        self._idle.pop(session_id, None)
        self._by_age.pop(session_id, None)
        owned = self._by_principal.get(session.principal)
        if owned is not None:
            owned.pop(session_id, None)
            if not owned:
                del self._by_principal[session.principal]
        return True
